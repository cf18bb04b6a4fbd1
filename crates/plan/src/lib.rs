//! tandem-plan
