//! Volumes: the LBA → content block map, read-modify-write for unaligned
//! requests, and per-range ordering.
