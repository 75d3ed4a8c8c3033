//! Rotation that runs itself: per-zone [`policy`] and the scheduler that
//! reads key ages against it and drives [`crate::rotation`] (never the
//! reverse).

pub mod policy;
pub mod predict;
pub mod queue;
pub mod scheduler;
pub mod threat;

pub use scheduler::{ScheduleError, Scheduler};
