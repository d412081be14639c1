//! Exporters: each translates the [`Snapshot`](crate::snapshot::Snapshot) into one wire format.

pub mod otlp;
pub mod prometheus;
