//! # tollgate
pub mod money;
pub mod usage;
pub mod pricing;
pub mod budget;
