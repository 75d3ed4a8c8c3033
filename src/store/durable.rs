//! The one door to durability: every fsync, fdatasync and msync the pool
//! relies on goes through here, so a power-loss simulation
//! ([`super::powerloss`]) can see what each one makes durable.
//!
//! Why this seam is safe: when no simulation is armed (always, outside
//! crash tests) each function is the plain syscall it replaces, after one
//! relaxed atomic load. An armed simulation only ever observes (it reads
//! the file through a separate descriptor, never moving the caller's file
//! offset) or fails a sync with EIO, which every caller must already handle
//! as a real fsync error (fail-stop). It is armed only by
//! [`super::powerloss::PowerLoss::arm`], never by configuration or
//! environment, and it acts only on files under the directory it was armed
//! for.

#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::path::Path;

use super::powerloss;

/// `fdatasync(file)`.
pub fn sync_data(file: &File) -> io::Result<()> {
    if !powerloss::armed() {
        return file.sync_data();
    }
    powerloss::sync_file(file, || file.sync_data())
}

/// `fsync(file)`.
pub fn sync_all(file: &File) -> io::Result<()> {
    if !powerloss::armed() {
        return file.sync_all();
    }
    powerloss::sync_file(file, || file.sync_all())
}

/// A sync of `file` done some other way (`msync` of its mapping): `sync`
/// runs it, and on success what it covered counts as durable.
pub fn sync_with(file: &File, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    if !powerloss::armed() {
        return sync();
    }
    powerloss::sync_file(file, sync)
}

/// `fsync` of the directory `dir`: the names in it (creations, renames,
/// removals) become durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    if !powerloss::armed() {
        return File::open(dir)?.sync_all();
    }
    powerloss::sync_dir(dir, || File::open(dir)?.sync_all())
}
