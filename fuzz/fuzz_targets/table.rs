//! The checkpoint tables as recovery opens them: a zone's content-block
//! table and a volume's map, from any file.
#![no_main]
use keyturn::ids::Lba;
use keyturn::zone::{VolumeMap, ZoneMeta};
use keyturn_fuzz::file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = file("table", data);
    if let Ok(mut meta) = ZoneMeta::open(&path, false) {
        let _ = meta.live_cbs();
        let _ = meta.live_records();
        let _ = meta.census();
    }
    let blocks = (data.len() as u64).saturating_sub(4096) / 8 + 1;
    if let Ok(map) = VolumeMap::open(&path, blocks, false) {
        let mapped = map.mapped();
        for (lba, cbid) in mapped.iter().take(64) {
            assert_eq!(map.get(*lba), Some(*cbid));
        }
        let _ = map.get(Lba(blocks));
    }
});
