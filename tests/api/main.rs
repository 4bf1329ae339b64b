//! Integration tests: one binary (one build) with a module per area.

mod helpers;

mod admin;
mod check;
mod config_validation;
mod propagation;
mod proxy;
mod usage;
