//! KMIP's TTLV wire encoding (Tag, Type, Length, Value), for the handful of
//! items the KMIP root key provider sends and reads.
//!
//! ```text
//! offset  size  field
//! 0       3     tag (big-endian, 0x42xxxx for KMIP's own tags)
//! 3       1     type (ItemType)
//! 4       4     length of the value in bytes (big-endian, before padding)
//! 8       n     value, zero-padded to a multiple of 8 bytes
//! ```
//!
//! Integers, enumerations and intervals are 4 bytes (padded to 8); long
//! integers, date-times and booleans are 8; a structure's value is its items
//! one after another. Written by hand rather than with `kmip-ttlv`: the
//! provider needs six operations, and a serde mapping of KMIP's nested,
//! order-sensitive payloads is more code than this encoder.
//!
//! Byte strings are held in zeroizing memory and shown in `Debug` by length
//! only: a Decrypt response carries a KEK in the clear.

use zeroize::Zeroizing;

/// Largest message accepted from a server; a root key exchange is a few
/// hundred bytes, so anything near this is a broken or hostile peer.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest structure nesting accepted when decoding.
const MAX_DEPTH: usize = 16;

/// KMIP item types (the byte after the tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum ItemType {
    Structure = 0x01,
    Integer = 0x02,
    LongInteger = 0x03,
    BigInteger = 0x04,
    Enumeration = 0x05,
    Boolean = 0x06,
    TextString = 0x07,
    ByteString = 0x08,
    DateTime = 0x09,
    Interval = 0x0A,
}

impl ItemType {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0x01 => Self::Structure,
            0x02 => Self::Integer,
            0x03 => Self::LongInteger,
            0x04 => Self::BigInteger,
            0x05 => Self::Enumeration,
            0x06 => Self::Boolean,
            0x07 => Self::TextString,
            0x08 => Self::ByteString,
            0x09 => Self::DateTime,
            0x0A => Self::Interval,
            _ => return None,
        })
    }
}

/// The value of one TTLV item.
#[derive(Clone, PartialEq, Eq)]
pub enum Value {
    /// Items in order.
    Structure(Vec<Item>),
    /// 32-bit signed integer.
    Integer(i32),
    /// 64-bit signed integer.
    LongInteger(i64),
    /// Big-endian two's complement bytes (a multiple of 8 long).
    BigInteger(Vec<u8>),
    /// 32-bit enumeration value.
    Enumeration(u32),
    /// Boolean.
    Boolean(bool),
    /// UTF-8 text.
    TextString(String),
    /// Bytes (zeroized on drop: may be key material).
    ByteString(Zeroizing<Vec<u8>>),
    /// Seconds since the Unix epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Structure(items) => f.debug_list().entries(items).finish(),
            Value::Integer(v) => write!(f, "Integer({v})"),
            Value::LongInteger(v) => write!(f, "LongInteger({v})"),
            Value::BigInteger(v) => write!(f, "BigInteger(<{} bytes>)", v.len()),
            Value::Enumeration(v) => write!(f, "Enumeration({v:#x})"),
            Value::Boolean(v) => write!(f, "Boolean({v})"),
            Value::TextString(v) => write!(f, "TextString({v:?})"),
            // Never the bytes: this may be a KEK on its way back.
            Value::ByteString(v) => write!(f, "ByteString(<{} bytes>)", v.len()),
            Value::DateTime(v) => write!(f, "DateTime({v})"),
            Value::Interval(v) => write!(f, "Interval({v})"),
        }
    }
}

/// One TTLV item: a tag and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The 24-bit tag.
    pub tag: u32,
    /// The value.
    pub value: Value,
}

/// Why bytes did not decode as TTLV. Positions only, never content.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TtlvError {
    /// The bytes end inside an item.
    #[error("TTLV ends early at byte {0}")]
    Truncated(usize),
    /// An item type this decoder does not know.
    #[error("unknown TTLV item type {ty:#04x} at byte {at}")]
    UnknownType {
        /// The type byte.
        ty: u8,
        /// Where the item starts.
        at: usize,
    },
    /// A fixed-size item with the wrong length, or a length past the limit.
    #[error("TTLV item at byte {at} has a bad length {len}")]
    BadLength {
        /// Where the item starts.
        at: usize,
        /// The length it claims.
        len: u32,
    },
    /// A text string that is not UTF-8.
    #[error("TTLV text string at byte {0} is not UTF-8")]
    BadText(usize),
    /// Structures nested deeper than a KMIP message ever needs.
    #[error("TTLV nested too deep at byte {0}")]
    TooDeep(usize),
    /// Bytes left over after the top-level item.
    #[error("{0} bytes after the TTLV message")]
    Trailing(usize),
}

impl Item {
    /// A structure.
    pub fn structure(tag: u32, items: Vec<Item>) -> Self {
        Self {
            tag,
            value: Value::Structure(items),
        }
    }
    /// An integer.
    pub fn integer(tag: u32, v: i32) -> Self {
        Self {
            tag,
            value: Value::Integer(v),
        }
    }
    /// An enumeration.
    pub fn enumeration(tag: u32, v: u32) -> Self {
        Self {
            tag,
            value: Value::Enumeration(v),
        }
    }
    /// A text string.
    pub fn text(tag: u32, v: &str) -> Self {
        Self {
            tag,
            value: Value::TextString(v.to_string()),
        }
    }
    /// A byte string (copied into zeroizing memory).
    pub fn bytes(tag: u32, v: &[u8]) -> Self {
        Self {
            tag,
            value: Value::ByteString(Zeroizing::new(v.to_vec())),
        }
    }

    /// The first child with `tag`, if this is a structure.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    /// Every child with `tag`, if this is a structure.
    pub fn children(&self, tag: u32) -> impl Iterator<Item = &Item> {
        let items: &[Item] = match &self.value {
            Value::Structure(items) => items,
            _ => &[],
        };
        items.iter().filter(move |i| i.tag == tag)
    }

    /// The text, if this is a text string.
    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::TextString(s) => Some(s),
            _ => None,
        }
    }

    /// The bytes, if this is a byte string.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::ByteString(b) => Some(b),
            _ => None,
        }
    }

    /// The value, if this is an enumeration.
    pub fn as_enum(&self) -> Option<u32> {
        match &self.value {
            Value::Enumeration(v) => Some(*v),
            _ => None,
        }
    }

    /// Encodes the item (and its children) as TTLV. The buffer is zeroizing
    /// because a request may carry a KEK to wrap.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        self.encode_into(&mut out);
        out
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        let (ty, body): (ItemType, Zeroizing<Vec<u8>>) = match &self.value {
            Value::Structure(items) => {
                let mut b = Zeroizing::new(Vec::new());
                for i in items {
                    i.encode_into(&mut b);
                }
                (ItemType::Structure, b)
            }
            Value::Integer(v) => (ItemType::Integer, Zeroizing::new(v.to_be_bytes().to_vec())),
            Value::LongInteger(v) => (
                ItemType::LongInteger,
                Zeroizing::new(v.to_be_bytes().to_vec()),
            ),
            Value::BigInteger(v) => (ItemType::BigInteger, Zeroizing::new(v.clone())),
            Value::Enumeration(v) => (
                ItemType::Enumeration,
                Zeroizing::new(v.to_be_bytes().to_vec()),
            ),
            Value::Boolean(v) => (
                ItemType::Boolean,
                Zeroizing::new(u64::from(*v).to_be_bytes().to_vec()),
            ),
            Value::TextString(s) => (ItemType::TextString, Zeroizing::new(s.as_bytes().to_vec())),
            Value::ByteString(b) => (ItemType::ByteString, Zeroizing::new(b.to_vec())),
            Value::DateTime(v) => (ItemType::DateTime, Zeroizing::new(v.to_be_bytes().to_vec())),
            Value::Interval(v) => (ItemType::Interval, Zeroizing::new(v.to_be_bytes().to_vec())),
        };
        out.push(ty as u8);
        let len = u32::try_from(body.len()).expect("a KMIP item under 4 GiB");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
        out.resize(out.len() + pad(body.len()), 0);
    }

    /// Decodes exactly one item filling `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, TtlvError> {
        let (item, used) = decode_at(bytes, 0, 0)?;
        if used != bytes.len() {
            return Err(TtlvError::Trailing(bytes.len() - used));
        }
        Ok(item)
    }
}

/// Zero bytes that follow a value of `len` bytes.
fn pad(len: usize) -> usize {
    (8 - len % 8) % 8
}

/// The total length (header, value, padding) of the message whose 8-byte
/// header is `header`: how many bytes to read off the wire.
pub fn message_len(header: &[u8; 8]) -> Result<usize, TtlvError> {
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n > MAX_MESSAGE {
        return Err(TtlvError::BadLength { at: 0, len });
    }
    Ok(8 + n + pad(n))
}

fn decode_at(bytes: &[u8], at: usize, depth: usize) -> Result<(Item, usize), TtlvError> {
    if depth > MAX_DEPTH {
        return Err(TtlvError::TooDeep(at));
    }
    let header = bytes
        .get(at..at + 8)
        .ok_or(TtlvError::Truncated(bytes.len()))?;
    let tag = u32::from_be_bytes([0, header[0], header[1], header[2]]);
    let ty = ItemType::from_byte(header[3]).ok_or(TtlvError::UnknownType { ty: header[3], at })?;
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    let n = usize::try_from(len).unwrap_or(usize::MAX);
    if n > MAX_MESSAGE {
        return Err(TtlvError::BadLength { at, len });
    }
    let start = at + 8;
    let body = bytes
        .get(start..start + n)
        .ok_or(TtlvError::Truncated(bytes.len()))?;
    let end = start + n + pad(n);
    if bytes.len() < end {
        return Err(TtlvError::Truncated(bytes.len()));
    }
    let fixed = |want: usize| {
        if n == want {
            Ok(())
        } else {
            Err(TtlvError::BadLength { at, len })
        }
    };
    let value = match ty {
        ItemType::Structure => {
            let mut items = Vec::new();
            let mut pos = start;
            while pos < start + n {
                let (item, next) = decode_at(&bytes[..start + n], pos, depth + 1)?;
                items.push(item);
                pos = next;
            }
            Value::Structure(items)
        }
        ItemType::Integer => {
            fixed(4)?;
            Value::Integer(i32::from_be_bytes(body.try_into().expect("4 bytes")))
        }
        ItemType::Enumeration => {
            fixed(4)?;
            Value::Enumeration(u32::from_be_bytes(body.try_into().expect("4 bytes")))
        }
        ItemType::Interval => {
            fixed(4)?;
            Value::Interval(u32::from_be_bytes(body.try_into().expect("4 bytes")))
        }
        ItemType::LongInteger => {
            fixed(8)?;
            Value::LongInteger(i64::from_be_bytes(body.try_into().expect("8 bytes")))
        }
        ItemType::DateTime => {
            fixed(8)?;
            Value::DateTime(i64::from_be_bytes(body.try_into().expect("8 bytes")))
        }
        ItemType::Boolean => {
            fixed(8)?;
            Value::Boolean(body.iter().any(|&b| b != 0))
        }
        ItemType::BigInteger => Value::BigInteger(body.to_vec()),
        ItemType::TextString => Value::TextString(
            std::str::from_utf8(body)
                .map_err(|_| TtlvError::BadText(at))?
                .to_string(),
        ),
        ItemType::ByteString => Value::ByteString(Zeroizing::new(body.to_vec())),
    };
    Ok((Item { tag, value }, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KMIP 1.4 test vectors (KMIP spec §9.1.2 examples).
    #[test]
    fn spec_examples_encode() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&Item::integer(0x420020, 8).encode()),
            "42002002000000040000000800000000"
        );
        assert_eq!(
            hex(&Item::enumeration(0x420020, 255).encode()),
            "4200200500000004000000ff00000000"
        );
        assert_eq!(
            hex(&Item::text(0x420020, "Hello World").encode()),
            "420020070000000b48656c6c6f20576f726c640000000000"
        );
        assert_eq!(
            hex(&Item::bytes(0x420020, &[1, 2, 3]).encode()),
            "42002008000000030102030000000000"
        );
        let s = Item::structure(
            0x420020,
            vec![
                Item::enumeration(0x420004, 254),
                Item::integer(0x420005, 255),
            ],
        );
        assert_eq!(
            hex(&s.encode()),
            "42002001000000204200040500000004000000fe000000004200050200000004000000ff00000000"
        );
    }

    #[test]
    fn round_trip() {
        let msg = Item::structure(
            0x420078,
            vec![
                Item::structure(
                    0x420077,
                    vec![Item::integer(0x42006A, 1), Item::integer(0x42006B, 4)],
                ),
                Item::bytes(0x4200C2, &[9; 33]),
                Item::text(0x420094, "é-1"),
                Item {
                    tag: 0x420001,
                    value: Value::Boolean(true),
                },
                Item {
                    tag: 0x420002,
                    value: Value::LongInteger(-5),
                },
                Item {
                    tag: 0x420003,
                    value: Value::DateTime(1_700_000_000),
                },
                Item {
                    tag: 0x420004,
                    value: Value::Interval(7),
                },
            ],
        );
        let bytes = msg.encode();
        assert_eq!(bytes.len() % 8, 0);
        let header: [u8; 8] = bytes[..8].try_into().unwrap();
        assert_eq!(message_len(&header).unwrap(), bytes.len());
        let back = Item::decode(&bytes).unwrap();
        assert_eq!(back, msg);
        assert_eq!(
            back.child(0x4200C2).unwrap().as_bytes(),
            Some(&[9u8; 33][..])
        );
        assert_eq!(back.child(0x420094).unwrap().as_text(), Some("é-1"));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let good = Item::structure(0x420078, vec![Item::integer(0x42006A, 1)]).encode();
        for cut in 0..good.len() {
            assert!(Item::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_type = good.to_vec();
        bad_type[3] = 0x7f;
        assert!(matches!(
            Item::decode(&bad_type),
            Err(TtlvError::UnknownType { .. })
        ));
        let mut bad_len = good.to_vec();
        bad_len[8 + 7] = 5; // the integer claims 5 bytes
        assert!(Item::decode(&bad_len).is_err());
        let mut trailing = good.to_vec();
        trailing.extend_from_slice(&[0; 8]);
        assert_eq!(Item::decode(&trailing), Err(TtlvError::Trailing(8)));
        // Nesting past the limit.
        let mut deep = Item::integer(0x420001, 1);
        for _ in 0..40 {
            deep = Item::structure(0x420002, vec![deep]);
        }
        assert!(matches!(
            Item::decode(&deep.encode()),
            Err(TtlvError::TooDeep(_))
        ));
        // A huge claimed length is refused before any allocation.
        let header = [0x42, 0, 0x78, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(message_len(&header).is_err());
    }

    #[test]
    fn debug_hides_byte_strings() {
        let secret = Item::bytes(0x4200C2, b"SECRET-KEY-BYTES");
        let shown = format!("{secret:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("16 bytes"), "{shown}");
    }
}
