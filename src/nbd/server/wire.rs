//! Reading exact byte counts off the stream, and draining payloads that
//! are refused so the stream stays framed.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::Fatal;

/// Reads exactly `buf.len()` bytes. `Ok(false)` if the stream ended before
/// the first byte (a clean close between messages).
pub(in crate::nbd) async fn read_or_eof<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<bool, Fatal> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = rd.read(&mut buf[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(false)
            } else {
                Err(Fatal::Truncated(what))
            };
        }
        filled += n;
    }
    Ok(true)
}

pub(in crate::nbd) async fn read_full<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), Fatal> {
    if read_or_eof(rd, buf, what).await? {
        Ok(())
    } else {
        Err(Fatal::Truncated(what))
    }
}

/// Reads a WRITE payload of `len` bytes straight into a new vector's spare
/// capacity, so up to 32 MiB is not zero-filled first.
pub(super) async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: u32,
) -> Result<Vec<u8>, Fatal> {
    let want = usize::try_from(len).unwrap_or(usize::MAX);
    let mut payload = Vec::with_capacity(want);
    // `take` keeps a larger spare capacity from reading into the next request.
    let mut limited = rd.take(u64::from(len));
    while payload.len() < want {
        if limited.read_buf(&mut payload).await? == 0 {
            return Err(Fatal::Truncated("write payload"));
        }
    }
    Ok(payload)
}

/// Reads and discards `len` bytes without buffering them.
pub(in crate::nbd) async fn drain<R: AsyncRead + Unpin>(
    rd: &mut R,
    len: u32,
    what: &'static str,
) -> Result<(), Fatal> {
    let len = u64::from(len);
    let copied = tokio::io::copy(&mut (&mut *rd).take(len), &mut tokio::io::sink()).await?;
    if copied == len {
        Ok(())
    } else {
        Err(Fatal::Truncated(what))
    }
}
