//! Integration tests: one binary (one build) with a module per area.

mod helpers;

mod admin;
mod check;
mod cli;
mod client;
mod concurrency;
mod config_validation;
mod credits;
mod demo;
mod deploy;
mod edges;
mod eviction;
mod exactness;
mod flush;
mod hostile;
mod leases;
mod levels;
mod metrics;
mod notifications;
mod openapi;
mod outage;
mod periods;
mod process;
mod propagation;
mod proxy;
mod reload;
mod reservations;
mod settle;
mod unlinked;
mod usage;
mod webhooks;
