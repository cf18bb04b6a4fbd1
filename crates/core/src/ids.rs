//! Newtypes for the indices that are easy to swap by accident.

use std::fmt;

macro_rules! id_type {
    ($(#[$m:meta])* $name:ident, $inner:ty) => {
        $(#[$m])*
        #[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub $inner);

        impl $name {
            pub fn idx(self) -> usize {
                self.0 as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id_type!(
    /// A decoder layer index, `0..num_hidden_layers`.
    LayerId, u32
);
id_type!(
    /// A routed expert index within a layer, `0..num_experts`.
    ExpertId, u32
);
id_type!(
    /// An attention replica, `0..n_a`.
    ReplicaId, u32
);
id_type!(
    /// An expert worker, `0..N`.
    WorkerId, u32
);
id_type!(
    /// A micro-batch slot of one iteration, `0..m`.
    MicroBatchId, u32
);
id_type!(
    /// A request, unique within one engine.
    RequestId, u64
);
