//! The read path: locating blocks, reading runs of slots, decrypting and
//! checking every block's tag, and falling back to other copies.

use futures::future::join_all;

use super::{Located, Volume, io_err};
use crate::crypto::tag::Tag;
use crate::ids::{BLOCK_SIZE, KeyVersion};
use crate::nbd::export::ExportError;
use crate::store::journal::{LiveCopy, Place};
use crate::zone::ZoneCrypto;

/// Number of times a read re-locates a block whose copy moved under it.
const READ_RETRIES: usize = 3;

impl Volume {
    /// Reads whole blocks starting at `first` into `out` (a multiple of the
    /// block size). The caller holds the range lock.
    pub(super) async fn read_blocks(&self, first: u64, out: &mut [u8]) -> Result<(), ExportError> {
        let n = (out.len() / BLOCK_SIZE) as u64;
        let located = self.locate(first..first + n)?;
        self.zone.note_io();
        let crypto = self.zone.crypto();
        let prefer_data = !self.storage.data.is_direct();
        // The copy each block is read from (cheap: a comparison or two).
        let source = |l: &Located| read_source(l, prefer_data, &crypto);
        // Group blocks into runs of consecutive slots on one device: one
        // device read each, from the run's first copy on.
        let mut runs: Vec<(usize, usize, LiveCopy)> = Vec::new();
        for (i, loc) in located.iter().enumerate() {
            match loc {
                None => out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].fill(0),
                Some(l) => {
                    self.zone.heat.touch(l.cbid);
                    let c = source(l);
                    match runs.last_mut() {
                        Some((start, len, first))
                            if *start + *len == i
                                && *len < self.storage.max_run_blocks()
                                && first.place == c.place
                                && first.slot.0 + *len as u64 == c.slot.0 =>
                        {
                            *len += 1
                        }
                        _ => runs.push((i, 1, c)),
                    }
                }
            }
        }
        let reads = runs.iter().map(|&(_, len, first)| {
            self.storage
                .read_copy(first.place, first.slot, self.storage.bufs.get(len))
        });
        let results = join_all(reads).await;
        let mut failed = Vec::new();
        for ((start, len, _), (res, buf)) in runs.into_iter().zip(results) {
            match res {
                Ok(()) => {
                    decrypt_verify_run(
                        &crypto,
                        &located[start..start + len],
                        |loc| source(loc).key_version,
                        &buf[..len * BLOCK_SIZE],
                        &mut out[start * BLOCK_SIZE..(start + len) * BLOCK_SIZE],
                        start,
                        &mut failed,
                    );
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, error = %e, "read failed; retrying block by block");
                    failed.extend(start..start + len);
                }
            }
            self.storage.bufs.put(buf);
        }
        drop(crypto);
        for i in failed {
            let dst = &mut out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            self.reread_block(first + i as u64, dst).await?;
        }
        Ok(())
    }

    /// Reads one block whose first read failed: the content block may have
    /// moved under the read (migration, destaging), or its live copy may sit
    /// on a failing device while another copy is intact. Tries the block's
    /// current copies, then reports EIO. Never serves unverified data.
    pub(super) async fn reread_block(&self, lba: u64, dst: &mut [u8]) -> Result<(), ExportError> {
        let mut last_error = String::from("integrity check failed");
        let mut tried: Vec<LiveCopy> = Vec::new();
        for _ in 0..READ_RETRIES {
            let Some(loc) = self.locate(lba..lba + 1)?[0] else {
                dst.fill(0);
                return Ok(());
            };
            let mut copies = vec![loc.live];
            if loc.live.place == Place::Staging {
                copies.push(LiveCopy {
                    place: Place::Data,
                    slot: loc.record.slot,
                    key_version: loc.record.key_version,
                });
            }
            let fresh: Vec<LiveCopy> = copies.into_iter().filter(|c| !tried.contains(c)).collect();
            if fresh.is_empty() {
                break;
            }
            for copy in fresh {
                tried.push(copy);
                let (res, buf) = self
                    .storage
                    .read_copy(copy.place, copy.slot, self.storage.bufs.get(1))
                    .await;
                let ok = match res {
                    Ok(()) => {
                        let crypto = self.zone.crypto();
                        decrypt_verify(&crypto, &loc, copy.key_version, &buf, dst)
                    }
                    Err(e) => {
                        last_error = e.to_string();
                        false
                    }
                };
                self.storage.bufs.put(buf);
                if ok {
                    if copy != loc.live {
                        self.zone
                            .stats
                            .read_fallbacks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(volume = %self.name, lba, cbid = %loc.cbid,
                            "live copy unreadable; served the verified copy on the {:?} device", copy.place);
                    }
                    return Ok(());
                }
            }
        }
        dst.fill(0);
        if let Some(loc) = self.locate(lba..lba + 1)?[0] {
            self.zone.meta.lock().forget_damaged(loc.cbid);
        }
        tracing::error!(volume = %self.name, lba, error = %last_error,
            "content block failed its integrity check or could not be read");
        Err(io_err(format!(
            "volume {} block {lba}: {last_error}",
            self.name
        )))
    }
}

/// Which copy of a located block a read fetches first. Normally the live
/// one. After a flip, a staged block keeps its data-device copy under the
/// old key (decrypt-only, still in memory) until the migrator destages it;
/// when the data device is read through the page cache that copy is most
/// likely cached, while the staging device is read with O_DIRECT, so the
/// data copy is read first. Both carry the same content and are checked
/// against the same tag; a read that fails its check (the block moved, or
/// the copy is damaged) falls back to every current copy.
fn read_source(loc: &Located, prefer_data: bool, crypto: &ZoneCrypto) -> LiveCopy {
    let data = LiveCopy {
        place: Place::Data,
        slot: loc.record.slot,
        key_version: loc.record.key_version,
    };
    if prefer_data && loc.live.place == Place::Staging && crypto.xts(data.key_version).is_some() {
        data
    } else {
        loc.live
    }
}

/// Decrypts one block of ciphertext under `version` and checks its tag.
/// On failure `dst` is zeroed (never left holding unverified plaintext).
fn decrypt_verify(
    crypto: &ZoneCrypto,
    loc: &Located,
    version: KeyVersion,
    src: &[u8],
    dst: &mut [u8],
) -> bool {
    let mut bad = Vec::new();
    decrypt_verify_run(crypto, &[Some(*loc)], |_| version, src, dst, 0, &mut bad);
    bad.is_empty()
}

/// [`decrypt_verify`] for a run of (mapped) blocks read in one piece:
/// decrypts each under the key version `version` picks, tags them in
/// batches, and pushes `first + j` to `bad` for each block `j` that failed
/// (its `dst` block zeroed). No allocation: batches of up to 64 blocks use
/// stack arrays.
fn decrypt_verify_run(
    crypto: &ZoneCrypto,
    blocks: &[Option<Located>],
    version: impl Fn(&Located) -> KeyVersion,
    src: &[u8],
    dst: &mut [u8],
    first: usize,
    bad: &mut Vec<usize>,
) {
    const BATCH: usize = 64;
    let batches = blocks
        .chunks(BATCH)
        .zip(src.chunks(BATCH * BLOCK_SIZE))
        .zip(dst.chunks_mut(BATCH * BLOCK_SIZE));
    for (b, ((blocks, src), dst)) in batches.enumerate() {
        let mut ok = [false; BATCH];
        for (((loc, ok), s), d) in blocks
            .iter()
            .zip(&mut ok)
            .zip(src.chunks_exact(BLOCK_SIZE))
            .zip(dst.chunks_exact_mut(BLOCK_SIZE))
        {
            let loc = loc.expect("runs hold mapped blocks");
            if let Some(xts) = crypto.xts(version(&loc)) {
                xts.decrypt(loc.cbid.0, s, d);
                *ok = true;
            }
        }
        let mut tags = [Tag::default(); BATCH];
        let tags = &mut tags[..blocks.len()];
        crypto.tagger().tag_blocks(dst, tags);
        for (j, (loc, tag)) in blocks.iter().zip(tags.iter()).enumerate() {
            let loc = loc.expect("runs hold mapped blocks");
            // A tag made under another MAC key (a MAC rotation under way)
            // is checked under that key.
            let good = if loc.record.mac == crypto.mac_version() {
                tag.ct_eq(&loc.record.tag)
            } else {
                crypto.verify_tag(
                    loc.record.mac,
                    &dst[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                    &loc.record.tag,
                )
            };
            if !(ok[j] && good) {
                dst[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE].fill(0);
                bad.push(first + b * BATCH + j);
            }
        }
    }
}
