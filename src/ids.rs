//! Newtypes for the ids and addresses that travel between modules.

use serde::{Deserialize, Serialize};

/// Size of a logical block and of a content block, in bytes.
pub const BLOCK_SIZE: usize = 4096;
/// `BLOCK_SIZE` as a shift.
pub const BLOCK_SHIFT: u32 = 12;

macro_rules! id_newtype {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub $t);

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_newtype!(
    /// Logical block address inside a volume (in 4 KiB blocks).
    Lba(u64)
);
id_newtype!(
    /// Content block id: stable for the life of a content block, and its XTS tweak.
    Cbid(u64)
);
id_newtype!(
    /// A 4 KiB slot on a device.
    Slot(u64)
);
id_newtype!(
    /// Version of a zone's data key (DEK); every content block records its own.
    KeyVersion(u32)
);
id_newtype!(
    /// A zone's numeric id.
    ZoneId(u32)
);
id_newtype!(
    /// A volume's numeric id.
    VolumeId(u32)
);
id_newtype!(
    /// Sequence number of a journal record.
    JournalSeq(u64)
);
