//! The building blocks of every body layout, over bincode's [`Encoder`] and [`Decoder`]:
//! varint lengths checked against a limit before anything is allocated, byte blobs, strings,
//! lists, fixed-size arrays and one-byte enum tags.

use bincode::de::Decoder;
use bincode::de::read::Reader;
use bincode::enc::Encoder;
use bincode::enc::write::Writer;
use bincode::error::{DecodeError, EncodeError};
use bincode::{Decode, Encode};

use super::frame::sealed::Wire;
use crate::limits::{MAX_ADDR_LEN, MAX_ADDRS};

/// A decode error with a message of our own.
pub(super) fn other(msg: String) -> DecodeError {
    DecodeError::OtherString(msg)
}

/// Writes a length as a varint.
pub(super) fn put_len<E: Encoder>(e: &mut E, n: usize) -> Result<(), EncodeError> {
    (n as u64).encode(e)
}

/// Reads a varint length and checks it against `max` before anything is allocated.
pub(super) fn get_len<D: Decoder>(d: &mut D, max: usize, what: &str) -> Result<usize, DecodeError> {
    let n = u64::decode(d)?;
    match usize::try_from(n) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(other(format!(
            "{what} claims length {n}; the limit is {max}"
        ))),
    }
}

/// Reads `n` raw bytes, allocating only as much as the input actually holds: one copy
/// when the input is a slice, chunks otherwise.
pub(super) fn get_raw<D: Decoder>(d: &mut D, n: usize) -> Result<Vec<u8>, DecodeError> {
    d.claim_bytes_read(n)?;
    if let Some(bytes) = d.reader().peek_read(n) {
        let v = bytes.to_vec();
        d.reader().consume(n);
        return Ok(v);
    }
    const CHUNK: usize = 64 * 1024;
    let mut v = Vec::with_capacity(n.min(CHUNK));
    let mut left = n;
    while left > 0 {
        let k = left.min(CHUNK);
        let start = v.len();
        v.resize(start + k, 0);
        d.reader().read(&mut v[start..])?;
        left -= k;
    }
    Ok(v)
}

/// Reads exactly `N` raw bytes (ids, keys, signatures).
pub(super) fn get_array<D: Decoder, const N: usize>(d: &mut D) -> Result<[u8; N], DecodeError> {
    d.claim_bytes_read(N)?;
    let mut out = [0u8; N];
    d.reader().read(&mut out)?;
    Ok(out)
}

/// Writes a byte blob: its length, then the bytes.
pub(super) fn put_bytes<E: Encoder>(e: &mut E, bytes: &[u8]) -> Result<(), EncodeError> {
    put_len(e, bytes.len())?;
    e.writer().write(bytes)
}

/// Reads a byte blob of at most `max` bytes.
pub(super) fn get_bytes<D: Decoder>(
    d: &mut D,
    max: usize,
    what: &str,
) -> Result<Vec<u8>, DecodeError> {
    let n = get_len(d, max, what)?;
    get_raw(d, n)
}

/// Reads a UTF-8 string of at most `max` bytes.
pub(super) fn get_string<D: Decoder>(
    d: &mut D,
    max: usize,
    what: &str,
) -> Result<String, DecodeError> {
    String::from_utf8(get_bytes(d, max, what)?).map_err(|e| DecodeError::Utf8 {
        inner: e.utf8_error(),
    })
}

/// Writes a list of strings: the count, then each as a blob.
pub(super) fn put_strings<E: Encoder>(e: &mut E, strings: &[String]) -> Result<(), EncodeError> {
    put_len(e, strings.len())?;
    for s in strings {
        put_bytes(e, s.as_bytes())?;
    }
    Ok(())
}

/// Reads a list of multiaddrs, checking the count and each length against the limits.
pub(super) fn get_addrs<D: Decoder>(d: &mut D) -> Result<Vec<String>, DecodeError> {
    let n = get_len(d, MAX_ADDRS, "address list")?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(get_string(d, MAX_ADDR_LEN, "address")?);
    }
    Ok(v)
}

/// Writes a list: the count, then each item.
pub(super) fn put_list<E: Encoder, T: Wire>(e: &mut E, items: &[T]) -> Result<(), EncodeError> {
    put_len(e, items.len())?;
    items.iter().try_for_each(|t| t.put(e))
}

/// Reads a list of at most `max` items, checking the count before allocating.
pub(super) fn get_list<D: Decoder, T: Wire>(
    d: &mut D,
    max: usize,
    what: &str,
) -> Result<Vec<T>, DecodeError> {
    let n = get_len(d, max, what)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(T::get(d)?);
    }
    Ok(v)
}

/// Writes a one-byte enum variant tag.
pub(super) fn put_tag<E: Encoder>(e: &mut E, tag: u8) -> Result<(), EncodeError> {
    tag.encode(e)
}

/// Reads a one-byte enum variant tag.
pub(super) fn get_tag<D: Decoder>(d: &mut D) -> Result<u8, DecodeError> {
    u8::decode(d)
}

/// The error for a variant tag this version does not know.
pub(super) fn unknown_tag(what: &str, tag: u8) -> DecodeError {
    other(format!("unknown {what} variant tag {tag}"))
}

/// Types whose wire encoding is bincode's own (varint integers).
macro_rules! wire_via_bincode {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put<E: Encoder>(&self, e: &mut E) -> Result<(), EncodeError> {
                self.encode(e)
            }
            fn get<D: Decoder>(d: &mut D) -> Result<Self, DecodeError> {
                <$t>::decode(d)
            }
        }
    )*};
}

wire_via_bincode!(u32);
