//! Simulated power loss at a chosen sync, for crash tests (in the manner of
//! LazyFS and redb's crash backend).
//!
//! A [`PowerLoss`] is armed on a pool directory. From then on it counts the
//! syncs made through [`super::durable`] on files under that directory and
//! keeps, per file (by inode) and per directory, the state the last
//! successful sync made durable. At the chosen sync (the Nth, counting
//! from one) it stops the world: instead of syncing, it writes to another
//! directory the state the disk could hold after a power loss at that
//! instant, and from then on every sync under the directory fails with EIO
//! (fail-stop), so nothing later is acknowledged.
//!
//! The image after the loss, chosen by a seeded RNG:
//! - what the last sync of a file made durable is always kept;
//! - each run of 4 KiB blocks written since (a write we cannot tell apart
//!   from its neighbours) is dropped, kept, or torn: a prefix of it, cut at
//!   512-byte or 4 KiB sector granularity (chosen per crash), is new and
//!   the rest old;
//! - a file's size change since its last sync is kept or lost;
//! - each name in a directory whose entry changed since the directory's
//!   last fsync (a creation, a rename over it, a removal) has its old or
//!   its new entry: a rename before its directory fsync may be lost.
//!
//! Limits: the durable state at arming is what is on disk then (arm on a
//! closed or freshly synced pool); a block written twice between syncs can
//! come back as the last version or the old one, never the middle one.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Granularity of the images kept (a page).
const BLOCK: u64 = 4096;

/// Simulations armed in this process (normally none).
static ARMED: AtomicUsize = AtomicUsize::new(0);
static SIMS: Mutex<Vec<Arc<Mutex<Sim>>>> = Mutex::new(Vec::new());

/// Whether any simulation is armed: the seam's fast path.
#[inline]
pub(crate) fn armed() -> bool {
    ARMED.load(Ordering::Relaxed) != 0
}

/// A file's contents: its length and its non-zero 4 KiB blocks.
#[derive(Clone, Default, PartialEq, Eq)]
struct Image {
    len: u64,
    blocks: BTreeMap<u64, Box<[u8]>>,
}

/// An entry of a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    File(u64),
    Dir,
}

struct Sim {
    root: PathBuf,
    out: PathBuf,
    crash_at: Option<u64>,
    seed: u64,
    syncs: u64,
    crashed: bool,
    /// Durable contents by inode.
    files: HashMap<u64, Image>,
    /// Durable entries by directory (relative to the root).
    dirs: HashMap<PathBuf, BTreeMap<OsString, Node>>,
    /// Every sync seen: (number, path relative to the root).
    trace: Vec<(u64, String)>,
}

/// A power-loss simulation armed on one directory; disarmed on drop.
pub struct PowerLoss {
    sim: Arc<Mutex<Sim>>,
}

impl PowerLoss {
    /// Arms a simulation on `root`, taking what is on disk now as durable.
    /// With `crash_at = Some(n)`, the nth sync under `root` writes the
    /// after-loss image (chosen by `seed`) to `image` and fails, as does
    /// every sync after it; with `None` it only counts.
    pub fn arm(root: &Path, crash_at: Option<u64>, seed: u64, image: &Path) -> io::Result<Self> {
        let root = root.canonicalize()?;
        let mut sim = Sim {
            root: root.clone(),
            out: image.to_path_buf(),
            crash_at,
            seed,
            syncs: 0,
            crashed: false,
            files: HashMap::new(),
            dirs: HashMap::new(),
            trace: Vec::new(),
        };
        sim.baseline(Path::new(""))?;
        let sim = Arc::new(Mutex::new(sim));
        SIMS.lock().push(sim.clone());
        ARMED.fetch_add(1, Ordering::AcqRel);
        Ok(Self { sim })
    }

    /// Syncs seen so far (including the one that crashed).
    pub fn syncs(&self) -> u64 {
        self.sim.lock().syncs
    }

    /// Whether the crash point was reached (the image is written).
    pub fn crashed(&self) -> bool {
        self.sim.lock().crashed
    }

    /// Every sync seen, as "N path" lines, to name the crash points.
    pub fn trace(&self) -> Vec<String> {
        self.sim
            .lock()
            .trace
            .iter()
            .map(|(n, p)| format!("{n} {p}"))
            .collect()
    }
}

impl Drop for PowerLoss {
    fn drop(&mut self) {
        SIMS.lock().retain(|s| !Arc::ptr_eq(s, &self.sim));
        ARMED.fetch_sub(1, Ordering::AcqRel);
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// The simulation watching `path`, if any.
fn sim_for(path: &Path) -> Option<Arc<Mutex<Sim>>> {
    SIMS.lock()
        .iter()
        .find(|s| path.starts_with(&s.lock().root))
        .cloned()
}

/// The path an open file has now (`None` once unlinked).
fn path_of(file: &File) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    (!p.to_string_lossy().ends_with(" (deleted)")).then_some(p)
}

/// A sync of `file` (by `real`) under an armed simulation.
pub(crate) fn sync_file(file: &File, real: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let Some(path) = path_of(file) else {
        return real();
    };
    let Some(sim) = sim_for(&path) else {
        return real();
    };
    // Held across the sync: syncs under one simulation are serialized, so
    // the crash image is one instant.
    let mut s = sim.lock();
    if s.before_sync(&path)? {
        // Read before the sync: what was written by then is what it
        // covers; a write racing with it (a stream append goes on while
        // its file syncs) stays unsynced.
        let ino = file.metadata()?.ino();
        let image = read_image(&reopen(file)?)?;
        real()?;
        s.files.insert(ino, image);
    }
    Ok(())
}

/// A sync of the directory `dir` (by `real`) under an armed simulation.
pub(crate) fn sync_dir(dir: &Path, real: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let Ok(dir) = dir.canonicalize() else {
        return real();
    };
    let Some(sim) = sim_for(&dir) else {
        return real();
    };
    let mut s = sim.lock();
    if s.before_sync(&dir)? {
        let rel = dir
            .strip_prefix(&s.root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let list = list(&dir)?;
        real()?;
        s.dirs.insert(rel, list);
    }
    Ok(())
}

/// A second descriptor on the same file, so reading it never moves the
/// caller's offset.
fn reopen(file: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

impl Sim {
    /// Counts a sync; at the crash point writes the image. `Ok(true)`: go
    /// on with the sync; an error: fail it.
    fn before_sync(&mut self, path: &Path) -> io::Result<bool> {
        if self.crashed {
            return Err(eio());
        }
        self.syncs += 1;
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        self.trace.push((self.syncs, rel.display().to_string()));
        if self.crash_at == Some(self.syncs) {
            self.crashed = true;
            let mut rng = StdRng::seed_from_u64(self.seed ^ self.syncs.rotate_left(32));
            let live = live_inodes(&self.root)?;
            let out = self.out.clone();
            self.write_image(Path::new(""), &out, &live, &mut rng)?;
            return Err(eio());
        }
        Ok(true)
    }

    /// Takes everything under `rel` as durable.
    fn baseline(&mut self, rel: &Path) -> io::Result<()> {
        let dir = self.root.join(rel);
        let entries = list(&dir)?;
        for (name, node) in &entries {
            match node {
                Node::Dir => self.baseline(&rel.join(name))?,
                Node::File(ino) => {
                    let image = read_image(&File::open(dir.join(name))?)?;
                    self.files.insert(*ino, image);
                }
            }
        }
        self.dirs.insert(rel.to_path_buf(), entries);
        Ok(())
    }

    /// Writes directory `rel` as it could be after the loss into `out`.
    fn write_image(
        &self,
        rel: &Path,
        out: &Path,
        live: &HashMap<u64, PathBuf>,
        rng: &mut StdRng,
    ) -> io::Result<()> {
        std::fs::create_dir_all(out)?;
        let durable = self.dirs.get(rel).cloned().unwrap_or_default();
        let now = list(&self.root.join(rel)).unwrap_or_default();
        let names: BTreeSet<&OsString> = durable.keys().chain(now.keys()).collect();
        for name in names {
            let (d, n) = (durable.get(name).copied(), now.get(name).copied());
            // An entry changed since the directory's last fsync may or may
            // not have reached the disk.
            let node = if d == n || rng.gen_bool(0.5) { n } else { d };
            match node {
                None => {}
                Some(Node::Dir) => self.write_image(&rel.join(name), &out.join(name), live, rng)?,
                Some(Node::File(ino)) => {
                    let old = self.files.get(&ino).cloned().unwrap_or_default();
                    let image = match live.get(&ino) {
                        Some(p) => after_loss(&old, &read_image(&File::open(p)?)?, rng),
                        // Unlinked since: only its durable state is left.
                        None => old,
                    };
                    write_file(&out.join(name), &image)?;
                }
            }
        }
        Ok(())
    }
}

/// The entries of a directory (regular files and directories).
fn list(dir: &Path) -> io::Result<BTreeMap<OsString, Node>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let m = e.metadata()?;
        if m.is_dir() {
            out.insert(e.file_name(), Node::Dir);
        } else if m.is_file() {
            out.insert(e.file_name(), Node::File(m.ino()));
        }
    }
    Ok(out)
}

/// Where each live inode under `root` is now.
fn live_inodes(root: &Path) -> io::Result<HashMap<u64, PathBuf>> {
    let mut out = HashMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for (name, node) in list(&dir)? {
            match node {
                Node::Dir => todo.push(dir.join(name)),
                Node::File(ino) => {
                    out.insert(ino, dir.join(name));
                }
            }
        }
    }
    Ok(out)
}

/// `lseek(fd, from, whence)` for SEEK_DATA / SEEK_HOLE; `None` past the
/// last data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| eio())?;
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(r as u64))
}

/// Reads a file's non-zero blocks, skipping holes (the data device is a
/// large sparse file). `file` must be a descriptor of our own: it seeks.
fn read_image(file: &File) -> io::Result<Image> {
    let len = file.metadata()?.len();
    let mut image = Image {
        len,
        blocks: BTreeMap::new(),
    };
    let mut pos = 0;
    let mut buf = vec![0u8; BLOCK as usize];
    while pos < len {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut b = data / BLOCK;
        while b * BLOCK < hole {
            buf.fill(0);
            let n = (len - b * BLOCK).min(BLOCK) as usize;
            file.read_exact_at(&mut buf[..n], b * BLOCK)?;
            if buf.iter().any(|&x| x != 0) {
                image.blocks.insert(b, buf.clone().into_boxed_slice());
            }
            b += 1;
        }
        pos = hole.max(b * BLOCK);
    }
    Ok(image)
}

/// What a file holds after the loss, from its durable state `old` and what
/// was written since, `new`.
fn after_loss(old: &Image, new: &Image, rng: &mut StdRng) -> Image {
    if old == new {
        return old.clone();
    }
    let sector: u64 = if rng.gen_bool(0.5) { 512 } else { BLOCK };
    let zero = vec![0u8; BLOCK as usize];
    let block = |i: &Image, b: u64| i.blocks.get(&b).map_or(&zero[..], |x| &x[..]).to_vec();
    let changed: Vec<u64> = old
        .blocks
        .keys()
        .chain(new.blocks.keys())
        .copied()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|b| old.blocks.get(b) != new.blocks.get(b))
        .collect();
    let mut out = old.clone();
    let mut kept_end = 0;
    // Runs of adjacent changed blocks: one write each, as far as we know.
    let mut i = 0;
    while i < changed.len() {
        let mut j = i + 1;
        while j < changed.len() && changed[j] == changed[j - 1] + 1 {
            j += 1;
        }
        let run = &changed[i..j];
        let bytes = run.len() as u64 * BLOCK;
        let units = bytes / sector;
        let cut = match rng.gen_range(0..3) {
            0 => 0,
            1 => bytes,
            _ if units > 1 => rng.gen_range(1..units) * sector,
            _ => bytes * u64::from(rng.gen_bool(0.5)),
        };
        for &b in run {
            let at = (b - run[0]) * BLOCK;
            let keep = cut.saturating_sub(at).min(BLOCK) as usize;
            if keep == 0 {
                continue;
            }
            let mut merged = block(old, b);
            merged[..keep].copy_from_slice(&block(new, b)[..keep]);
            kept_end = kept_end.max(b * BLOCK + keep as u64);
            if merged.iter().all(|&x| x == 0) {
                out.blocks.remove(&b);
            } else {
                out.blocks.insert(b, merged.into_boxed_slice());
            }
        }
        i = j;
    }
    out.len = if old.len == new.len || rng.gen_bool(0.5) {
        new.len
    } else {
        old.len
    };
    out.len = out.len.max(kept_end.min(new.len));
    out.blocks.retain(|&b, _| b * BLOCK < out.len);
    out
}

/// Writes an image as a (sparse) file.
fn write_file(path: &Path, image: &Image) -> io::Result<()> {
    let f = File::create(path)?;
    f.set_len(image.len)?;
    for (b, data) in &image.blocks {
        let n = (image.len - b * BLOCK).min(BLOCK) as usize;
        f.write_all_at(&data[..n], b * BLOCK)?;
    }
    Ok(())
}

/// Copies a directory tree, keeping files sparse: to start each crash run
/// from the same state.
pub fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::create_dir_all(to)?;
    for (name, node) in list(from)? {
        match node {
            Node::Dir => copy_tree(&from.join(&name), &to.join(&name))?,
            Node::File(_) => {
                let image = read_image(&File::open(from.join(&name))?)?;
                write_file(&to.join(&name), &image)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_data_survives_and_unsynced_writes_are_dropped_kept_or_torn() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pool");
        std::fs::create_dir(&root).unwrap();
        let mut outcomes = BTreeSet::new();
        for seed in 0..40 {
            let img = dir.path().join(format!("img{seed}"));
            let path = root.join(format!("f{seed}"));
            let f = File::create(&path).unwrap();
            crate::store::durable::sync_dir(&root).unwrap();
            let sim = PowerLoss::arm(&root, Some(3), seed, &img).unwrap();
            f.write_all_at(&[1u8; 8192], 0).unwrap();
            crate::store::durable::sync_data(&f).unwrap(); // 1
            crate::store::durable::sync_dir(&root).unwrap(); // 2
            f.write_all_at(&[2u8; 8192], 8192).unwrap();
            let e = crate::store::durable::sync_data(&f).unwrap_err(); // 3: crash
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
            assert!(sim.crashed());
            assert!(crate::store::durable::sync_data(&f).is_err(), "fail-stop");
            let got = std::fs::read(img.join(format!("f{seed}"))).unwrap();
            assert!(got.len() >= 8192 && got[..8192].iter().all(|&b| b == 1));
            let tail = &got[8192..];
            // The unsynced write: absent, whole, or a prefix of 512-byte sectors.
            let new = tail.iter().take_while(|&&b| b == 2).count();
            assert!(tail[new..].iter().all(|&b| b == 0));
            assert_eq!(new % 512, 0);
            outcomes.insert(new.min(1) + new / 8192);
            drop(sim);
        }
        assert_eq!(outcomes.len(), 3, "dropped, torn and kept all occur");
    }

    #[test]
    fn a_rename_before_its_directory_fsync_may_be_lost() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pool");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("keys"), b"old").unwrap();
        let mut seen = BTreeSet::new();
        for seed in 0..20 {
            let img = dir.path().join(format!("img{seed}"));
            let sim = PowerLoss::arm(&root, Some(2), seed, &img).unwrap();
            let tmp = root.join("keys.tmp");
            let f = File::create(&tmp).unwrap();
            f.write_all_at(b"new", 0).unwrap();
            crate::store::durable::sync_all(&f).unwrap();
            std::fs::rename(&tmp, root.join("keys")).unwrap();
            assert!(crate::store::durable::sync_dir(&root).is_err());
            seen.insert(std::fs::read(img.join("keys")).unwrap());
            assert!(!img.join("keys.tmp").exists(), "never durable");
            drop(sim);
            std::fs::write(root.join("keys"), b"old").unwrap();
        }
        let want: BTreeSet<Vec<u8>> = [b"old".to_vec(), b"new".to_vec()].into();
        assert_eq!(seen, want, "the file is whole, old or new");
    }
}
