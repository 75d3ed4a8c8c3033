//! Storage: devices (io_uring), the write-ahead journal, memory-mapped
//! tables and slot allocators.

pub mod device;
pub mod fault;
mod uring;
