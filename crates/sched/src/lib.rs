//! tandem-sched
