//! `pool.toml` and hardware profile files, loaded as `serve` loads them.
#![no_main]
use keyturn::config::{PoolConfig, Profile};
use keyturn_fuzz::file;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = file("pool.toml", data);
    if let Ok(c) = PoolConfig::load(&path) {
        // What loads must write back as text that loads again alike.
        let again = file("again.toml", c.to_toml().as_bytes());
        let back = PoolConfig::load(&again).expect("a loaded config reloads");
        assert_eq!(back.to_toml(), c.to_toml());
    }
    let path = file("profile.toml", data);
    let _ = Profile::load(path.to_str().expect("utf-8 scratch path"));
});
