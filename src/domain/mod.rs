//! The domain: org ids, plans and limits, periods, decisions and how they are rendered. Pure
//! types and rules, no I/O, so every rule is unit-testable without Redis or Postgres.

pub mod credit;
pub mod decision;
pub mod level;
pub mod notify;
pub mod org;
pub mod period;
pub mod plan;
pub mod render;
pub mod reservation;
pub mod subscription;
pub mod text;
