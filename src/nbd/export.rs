//! The seam between the NBD server and the block devices it serves.

use std::future::Future;
use std::sync::Arc;

/// Why an export operation failed; the server maps each kind to an NBD errno
/// (and logs the message before reducing it to that code).
#[derive(Clone, Debug, thiserror::Error)]
pub enum ExportError {
    /// Stored data could not be read or written, or failed its integrity check (EIO).
    #[error("I/O error: {0}")]
    Io(String),
    /// The request is malformed for this export (EINVAL).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// No space left to store the data (ENOSPC).
    #[error("no space: {0}")]
    NoSpace(String),
    /// The operation is not supported (ENOTSUP).
    #[error("not supported: {0}")]
    NotSupported(String),
    /// The export is shutting down (ESHUTDOWN).
    #[error("shutting down")]
    Shutdown,
}

/// One extent of a block-status answer, contiguous from the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length: u64,
    /// No storage is allocated for this range (NBD_STATE_HOLE).
    pub hole: bool,
    /// The range reads as zeros (NBD_STATE_ZERO). Must only be set when true.
    pub zero: bool,
}

/// A block device behind one NBD export. The server validates every request
/// (in range, length within the advertised maximum) before calling these.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<(), ExportError>> + Send + 'a;

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write<'a>(
        &'a self,
        offset: u64,
        data: &'a [u8],
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send + 'a;

    /// Writes several requests that arrived together, none with FUA, and
    /// returns one result per write, in order. The outcome is that of the
    /// writes applied one at a time in some order. An export may apply them
    /// together (keyturn: one device write and one journal frame); the
    /// default applies them one at a time.
    fn write_batch<'a>(
        &'a self,
        writes: &'a [(u64, &'a [u8])],
    ) -> impl Future<Output = Vec<Result<(), ExportError>>> + Send + 'a {
        async move {
            let mut results = Vec::with_capacity(writes.len());
            for &(offset, data) in writes {
                results.push(self.write(offset, data, false).await);
            }
            results
        }
    }

    /// Makes every completed write durable (on every connection: multi-conn consistency).
    fn flush(&self) -> impl Future<Output = Result<(), ExportError>> + Send + '_;

    /// Discards a range; it may read back as anything afterwards (keyturn: zeros).
    fn trim(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send + '_;

    /// Makes a range read as zeros.
    fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
    ) -> impl Future<Output = Result<(), ExportError>> + Send + '_;

    /// Allocation state of `[offset, offset + length)`: contiguous extents
    /// starting at `offset`, covering at least one byte and at most `length`.
    fn block_status(
        &self,
        offset: u64,
        length: u64,
    ) -> impl Future<Output = Result<Vec<Extent>, ExportError>> + Send + '_;
}

/// A listed export.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Export name.
    pub name: String,
    /// Free-form description for NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// The set of exports a server offers.
pub trait ExportCatalog: Send + Sync + 'static {
    /// The export type.
    type Export: Export;

    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportInfo>;

    /// The export named `name`, if any. The server holds the returned handle
    /// for as long as a connection uses it.
    fn open(&self, name: &str) -> Option<Arc<Self::Export>>;
}
