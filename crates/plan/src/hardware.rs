//! The hardware catalog: per-device peak numbers, links, prices and efficiency factors.
//!
//! The shipped catalog is `catalog/hardware.toml` (embedded in the binary); users extend or
//! override it with their own file of the same shape.

use crate::error::{read_file, PlanError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

const BUILTIN: &str = include_str!("../catalog/hardware.toml");

/// Element type the device computes and stores in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    F16,
    F32,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> f64 {
        match self {
            Dtype::Bf16 | Dtype::F16 => 2.0,
            Dtype::F32 => 4.0,
        }
    }
}

/// Achieved / peak ratios and fixed costs. All fractions in (0, 1]; times in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Efficiency {
    /// GEMM FLOP/s over dense peak.
    pub gemm: f64,
    /// Streaming-read bandwidth over peak memory bandwidth.
    pub memory: f64,
    /// Collective bus bandwidth over the intra-node link's rate.
    pub intra_link: f64,
    /// Network goodput over line rate for large messages.
    pub nic_peak_util: f64,
    /// Fixed cost of one M2N message, microseconds. Sets `Util(size)`.
    pub nic_latency_us: f64,
    /// Fixed cost of one intra-node collective, microseconds.
    pub collective_latency_us: f64,
    /// Fixed cost of one pipeline stage of one layer (kernel launches), microseconds.
    pub stage_overhead_us: f64,
}

impl Default for Efficiency {
    fn default() -> Self {
        Self {
            gemm: 0.70,
            memory: 0.80,
            intra_link: 0.80,
            nic_peak_util: 0.90,
            nic_latency_us: 10.0,
            collective_latency_us: 8.0,
            stage_overhead_us: 20.0,
        }
    }
}

/// Per-device override of some efficiency factors.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficiencyOverride {
    pub gemm: Option<f64>,
    pub memory: Option<f64>,
    pub intra_link: Option<f64>,
    pub nic_peak_util: Option<f64>,
    pub nic_latency_us: Option<f64>,
    pub collective_latency_us: Option<f64>,
    pub stage_overhead_us: Option<f64>,
}

impl EfficiencyOverride {
    fn apply(&self, base: Efficiency) -> Efficiency {
        Efficiency {
            gemm: self.gemm.unwrap_or(base.gemm),
            memory: self.memory.unwrap_or(base.memory),
            intra_link: self.intra_link.unwrap_or(base.intra_link),
            nic_peak_util: self.nic_peak_util.unwrap_or(base.nic_peak_util),
            nic_latency_us: self.nic_latency_us.unwrap_or(base.nic_latency_us),
            collective_latency_us: self
                .collective_latency_us
                .unwrap_or(base.collective_latency_us),
            stage_overhead_us: self.stage_overhead_us.unwrap_or(base.stage_overhead_us),
        }
    }
}

/// One device kind (one GPU, or the whole CPU for the placeholder profile).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// True for entries that are not measured or not real hardware (the CPU placeholder).
    #[serde(default)]
    pub placeholder: bool,
    pub dtype: Dtype,
    /// Dense peak, TFLOP/s (1e12 FLOP/s) in `dtype`.
    pub tflops: f64,
    /// Peak memory bandwidth, GB/s (1e9 bytes/s).
    pub mem_bw_gb_s: f64,
    /// Device memory, GB (1e9 bytes).
    pub memory_gb: f64,
    /// Most devices in one node (bounds tensor parallelism: `M_a`, `M_e`).
    pub gpus_per_node: u32,
    pub intra_link: String,
    /// Intra-node link per GPU per direction, GB/s (1e9 bytes/s).
    pub intra_link_gb_s: f64,
    /// Scale-out network per GPU, Gbit/s (1e9 bits/s).
    pub nic_gbit_s: f64,
    /// Board power, W.
    #[serde(default)]
    pub power_w: Option<f64>,
    /// Price per GPU relative to an L20 (the paper's Table 3 unit).
    #[serde(default)]
    pub price_norm: Option<f64>,
    /// True where `price_norm` is our estimate, not the paper's number.
    #[serde(default)]
    pub price_norm_estimated: bool,
    #[serde(default)]
    pub price_source: String,
    /// Public on-demand price, USD per GPU-hour.
    #[serde(default)]
    pub usd_per_hour: Option<f64>,
    #[serde(default)]
    pub usd_source: Option<String>,
    #[serde(default)]
    pub spec_source: String,
    #[serde(default)]
    pub efficiency: Option<EfficiencyOverride>,
    /// Where pods of this device run on Kubernetes (`tandem k8s`); none: any node, CPU only.
    #[serde(default)]
    pub k8s: Option<K8sPlacement>,
}

/// How a device is asked for on Kubernetes: the extended resource one device is counted in
/// and the node labels of the pool that has it (matched with `In`, so several accepted
/// values, e.g. the product names of two SKUs, may be listed).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sPlacement {
    /// Extended resource one device is (e.g. `nvidia.com/gpu`); none: a CPU device.
    #[serde(default)]
    pub resource: Option<String>,
    /// Node label -> accepted values (e.g. `nvidia.com/gpu.product` -> `["NVIDIA-H20"]`).
    #[serde(default)]
    pub node_labels: BTreeMap<String, Vec<String>>,
}

/// Which price ranks plans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PriceUnit {
    /// The paper's normalised price (L20 = 1.00).
    #[default]
    Norm,
    /// USD per GPU-hour.
    Usd,
}

impl Hardware {
    /// Peak dense compute, FLOP/s.
    pub fn peak_flops(&self) -> f64 {
        self.tflops * 1e12
    }
    /// Peak memory bandwidth, bytes/s.
    pub fn mem_bw_bytes_s(&self) -> f64 {
        self.mem_bw_gb_s * 1e9
    }
    /// Device memory, bytes.
    pub fn memory_bytes(&self) -> f64 {
        self.memory_gb * 1e9
    }
    /// Intra-node link per direction, bytes/s.
    pub fn intra_link_bytes_s(&self) -> f64 {
        self.intra_link_gb_s * 1e9
    }
    /// Network per GPU, bytes/s (`W` in Eq. 6).
    pub fn nic_bytes_s(&self) -> f64 {
        self.nic_gbit_s * 1e9 / 8.0
    }
    /// Bytes per element of weights, activations and KV cache.
    pub fn elem_bytes(&self) -> f64 {
        self.dtype.bytes()
    }
    /// Price of one device for one hour in `unit`.
    pub fn price(&self, unit: PriceUnit) -> Result<f64> {
        let (p, u, f) = match unit {
            PriceUnit::Norm => (self.price_norm, "normalised", "price_norm"),
            PriceUnit::Usd => (self.usd_per_hour, "USD", "usd_per_hour"),
        };
        p.filter(|p| *p > 0.0).ok_or(PlanError::NoPrice {
            hw: self.name.clone(),
            unit: u,
            field: f,
        })
    }
    /// `name` is this device's name or one of its aliases (any case).
    pub fn matches(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }
    fn validate(&self) -> Result<()> {
        let pos = [
            ("tflops", self.tflops),
            ("mem_bw_gb_s", self.mem_bw_gb_s),
            ("memory_gb", self.memory_gb),
            ("intra_link_gb_s", self.intra_link_gb_s),
            ("nic_gbit_s", self.nic_gbit_s),
        ];
        for (field, v) in pos {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::Invalid(format!(
                    "hardware {}: {field} must be a positive number, got {v}",
                    self.name
                )));
            }
        }
        if self.gpus_per_node == 0 {
            return Err(PlanError::Invalid(format!(
                "hardware {}: gpus_per_node must be at least 1",
                self.name
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    efficiency: Option<EfficiencyOverride>,
    #[serde(default)]
    device: Vec<Hardware>,
}

/// The set of known devices plus the default efficiency factors.
#[derive(Debug, Clone)]
pub struct HardwareCatalog {
    pub defaults: Efficiency,
    pub devices: Vec<Hardware>,
}

impl HardwareCatalog {
    /// The shipped catalog.
    pub fn builtin() -> Result<Self> {
        let mut c = Self {
            defaults: Efficiency::default(),
            devices: Vec::new(),
        };
        c.merge_str(BUILTIN, "<builtin hardware.toml>")?;
        Ok(c)
    }

    /// Adds (or replaces, by name) the devices of a TOML text; its `[efficiency]` replaces
    /// the defaults field by field.
    pub fn merge_str(&mut self, text: &str, origin: &str) -> Result<()> {
        let f: CatalogFile = toml::from_str(text).map_err(|e| PlanError::Parse {
            path: origin.to_string(),
            msg: e.to_string(),
        })?;
        if let Some(e) = f.efficiency {
            self.defaults = e.apply(self.defaults);
        }
        for d in f.device {
            d.validate()?;
            match self
                .devices
                .iter_mut()
                .find(|x| x.name.eq_ignore_ascii_case(&d.name))
            {
                Some(slot) => *slot = d,
                None => self.devices.push(d),
            }
        }
        Ok(())
    }

    /// Adds the devices of a user file.
    pub fn merge_file(&mut self, path: &Path) -> Result<()> {
        let text = read_file(path)?;
        self.merge_str(&text, &path.display().to_string())
    }

    /// A device by name or alias, case-insensitive.
    pub fn get(&self, name: &str) -> Result<&Hardware> {
        self.devices
            .iter()
            .find(|d| d.matches(name))
            .ok_or_else(|| PlanError::UnknownHardware {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.clone()).collect()
    }

    /// `chosen` if it names any device, else every measured (non-placeholder) device: the
    /// hardware a plan search covers when none is given.
    pub fn or_measured(&self, chosen: &[String]) -> Vec<String> {
        if !chosen.is_empty() {
            return chosen.to_vec();
        }
        self.devices
            .iter()
            .filter(|d| !d.placeholder)
            .map(|d| d.name.clone())
            .collect()
    }

    /// The efficiency factors that apply to `hw`.
    pub fn efficiency(&self, hw: &Hardware) -> Efficiency {
        match &hw.efficiency {
            Some(o) => o.apply(self.defaults),
            None => self.defaults,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_has_the_required_devices() {
        let c = HardwareCatalog::builtin().unwrap();
        for n in [
            "A100", "A800", "H100", "H800", "H20", "H200", "L20", "L40S", "B200", "cpu",
        ] {
            assert!(c.get(n).is_ok(), "{n}");
        }
        let cpu = c.get("cpu").unwrap();
        assert!(cpu.placeholder);
        assert_eq!(cpu.elem_bytes(), 4.0);
        assert!(c.efficiency(cpu).gemm < c.defaults.gemm);
        // Paper Table 3 numbers are kept exactly.
        let h20 = c.get("h20").unwrap();
        assert_eq!(h20.price_norm, Some(1.85));
        assert_eq!(h20.mem_bw_gb_s, 4096.0);
        assert!((h20.nic_bytes_s() - 25e9).abs() < 1.0);
    }

    #[test]
    fn gpu_devices_name_their_kubernetes_pool() {
        let c = HardwareCatalog::builtin().unwrap();
        let pool = |n: &str| c.get(n).unwrap().k8s.clone().unwrap();
        let (h20, l40s) = (pool("H20"), pool("L40S"));
        assert_eq!(h20.resource.as_deref(), Some("nvidia.com/gpu"));
        assert_eq!(
            h20.node_labels["nvidia.com/gpu.product"],
            vec!["NVIDIA-H20".to_string()]
        );
        assert_eq!(
            l40s.node_labels["nvidia.com/gpu.product"],
            vec!["NVIDIA-L40S".to_string()]
        );
        for d in c.devices.iter().filter(|d| !d.placeholder) {
            assert!(
                d.k8s.as_ref().is_some_and(|k| !k.node_labels.is_empty()),
                "{}",
                d.name
            );
        }
        assert_eq!(c.get("cpu").unwrap().k8s, None);
    }

    #[test]
    fn user_file_overrides_and_extends() {
        let mut c = HardwareCatalog::builtin().unwrap();
        c.merge_str(
            r#"
[[device]]
name = "H20"
dtype = "bf16"
tflops = 148.0
mem_bw_gb_s = 4000.0
memory_gb = 96.0
gpus_per_node = 8
intra_link = "NVLink"
intra_link_gb_s = 450.0
nic_gbit_s = 400.0
price_norm = 2.0

[[device]]
name = "MI300X"
dtype = "bf16"
tflops = 1307.0
mem_bw_gb_s = 5300.0
memory_gb = 192.0
gpus_per_node = 8
intra_link = "Infinity Fabric"
intra_link_gb_s = 448.0
nic_gbit_s = 400.0
"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.get("H20").unwrap().mem_bw_gb_s, 4000.0);
        assert!(c.get("mi300x").is_ok());
        let e = c.get("mi300x").unwrap().price(PriceUnit::Norm).unwrap_err();
        assert!(e.to_string().contains("price_norm"), "{e}");
    }

    #[test]
    fn rejects_bad_devices() {
        let mut c = HardwareCatalog::builtin().unwrap();
        let e = c
            .merge_str(
                "[[device]]\nname='x'\ndtype='bf16'\ntflops=0.0\nmem_bw_gb_s=1.0\nmemory_gb=1.0\ngpus_per_node=1\nintra_link='x'\nintra_link_gb_s=1.0\nnic_gbit_s=1.0\n",
                "t",
            )
            .unwrap_err();
        assert!(e.to_string().contains("tflops"), "{e}");
        assert!(c.merge_str("[[device]]\nname = 3\n", "t").is_err());
    }

    #[test]
    fn or_measured_keeps_a_choice_else_takes_every_measured_device() {
        let c = HardwareCatalog::builtin().unwrap();
        assert_eq!(c.or_measured(&["H20".into()]), vec!["H20".to_string()]);
        let all = c.or_measured(&[]);
        let measured: Vec<&Hardware> = c.devices.iter().filter(|d| !d.placeholder).collect();
        assert!(!measured.is_empty());
        assert_eq!(all.len(), measured.len());
        assert!(measured.iter().zip(&all).all(|(d, n)| &d.name == n));
    }
}
