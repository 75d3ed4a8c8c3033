//! Blocks under a shared file mapping must exist before the mapping is
//! touched. The checkpoint tables are files used through mmap; were they
//! sparse, a store into a hole would make the kernel allocate a block, and
//! on a full filesystem it cannot: the process gets SIGBUS and dies. On
//! tmpfs even a load from a hole allocates (seen: the server vanished on
//! the first write after its metadata directory filled up). So a table's
//! blocks are allocated with `fallocate` when the file is made or grown,
//! where ENOSPC is an error the caller can report, never a signal.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Allocates the blocks of `file` under `offset..offset + len`, extending
/// its size to the end of the range if it is shorter. `Ok(false)` when the
/// filesystem has no `fallocate` (nothing can be done ahead there).
pub(crate) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: fallocate on a descriptor we own, with no memory arguments.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            0,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        return Ok(false);
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn allocates_and_extends() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("t"))
            .unwrap();
        f.set_len(4096).unwrap();
        if !allocate(&f, 4096, 1 << 20).unwrap() {
            return; // no fallocate on this filesystem: nothing to check
        }
        let m = f.metadata().unwrap();
        assert_eq!(m.len(), 4096 + (1 << 20), "extended to the range's end");
        assert!(m.blocks() * 512 >= 1 << 20, "{} blocks", m.blocks());
    }
}
