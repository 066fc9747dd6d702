//! kvtier
pub mod model;
