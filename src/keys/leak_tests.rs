//! DESIGN invariant 8: no key bytes or passphrase in any error message or
//! `Debug` string. Every error this module can produce, and the `Debug` of
//! every type, is formatted and searched for the secrets in the encodings
//! they would most likely leak in.

use std::error::Error as _;

use base64ct::{Base64, Base64Unpadded, Encoding};

use super::passphrase::Passphrase;
use super::root::RootKeyProvider;
use super::sealed::{KdfParams, SealedFileProvider};
use super::wrap;
use super::zone_keys::ZoneKeyFile;
use super::{DataKey, Kek, KeyError, MacKey, RootKey};
use crate::ids::{KeyVersion, ZoneId};

const PASS: &str = "correct horse battery staple 42";

fn needles(secret: &[u8]) -> Vec<String> {
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let dec = secret[..8]
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        hex[..16].to_string(),
        hex[..16].to_uppercase(),
        // Prefixes catch a secret embedded mid-message as well as a whole one.
        Base64::encode_string(secret)[..12].to_string(),
        Base64Unpadded::encode_string(&secret[1..])[..12].to_string(),
        dec,
    ]
}

fn full_text(e: &KeyError) -> String {
    let mut s = format!("{e}\n{e:?}\n");
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!("{x}\n{x:?}\n"));
        src = x.source();
    }
    s
}

#[test]
fn no_secrets_in_errors_or_debug() {
    let dir = tempfile::tempdir().unwrap();
    let pass = Passphrase::new(PASS.into()).unwrap();
    let root_path = dir.path().join("root.json");
    let provider = SealedFileProvider::create(&root_path, &pass, KdfParams::INSECURE_FAST).unwrap();
    let mut zone = ZoneKeyFile::create(&provider, ZoneId(7), "leaky").unwrap();
    zone.add_dek_version(&provider).unwrap();
    let zone_path = dir.path().join("zone.json");
    zone.save(&zone_path).unwrap();
    let ring = zone.unlock(&provider).unwrap();

    // Every secret in play.
    let kek_record = &zone.records()[0];
    let kek_plain = provider
        .unwrap_key(&kek_record.label(), kek_record.wrapped.as_deref().unwrap())
        .unwrap();
    let dek1 = ring.dek(KeyVersion(1)).unwrap();
    let dek2 = ring.dek(KeyVersion(2)).unwrap();
    let mut secrets: Vec<Vec<u8>> = vec![
        provider.root_for_tests().expose().to_vec(),
        kek_plain.to_vec(),
        dek1.expose().to_vec(),
        dek1.expose()[32..].to_vec(),
        dek2.expose().to_vec(),
        ring.mac_key().expose().to_vec(),
    ];
    secrets.push(PASS.as_bytes().to_vec());
    let mut forbidden: Vec<String> = secrets.iter().flat_map(|s| needles(s)).collect();
    forbidden.push(PASS.to_string());
    forbidden.push("horse battery".to_string());

    let mut texts: Vec<String> = Vec::new();

    // Debug of every type that holds or surrounds a secret.
    texts.push(format!("{pass:?}"));
    texts.push(format!("{provider:?}"));
    texts.push(provider.describe());
    texts.push(format!("{zone:?}"));
    texts.push(format!("{:?}", zone.records()));
    texts.push(format!("{ring:?}"));
    texts.push(format!("{dek1:?} {:?}", ring.mac_key()));
    texts.push(format!(
        "{:?} {:?} {:?} {:?}",
        RootKey::generate(),
        Kek::generate(),
        DataKey::generate(),
        MacKey::generate()
    ));
    texts.push(format!("{:?} {}", kek_record.label(), kek_record.label()));
    texts.push(format!("{:?}", KdfParams::default()));

    // Every error, produced the way it really arises where possible.
    let mut errors: Vec<KeyError> = Vec::new();
    let wrong = Passphrase::new("wrong".into()).unwrap();
    errors.push(SealedFileProvider::open(&root_path, &wrong).unwrap_err());
    errors
        .push(SealedFileProvider::create(&root_path, &pass, KdfParams::INSECURE_FAST).unwrap_err());
    errors.push(SealedFileProvider::open(&dir.path().join("absent"), &pass).unwrap_err());
    errors.push(
        SealedFileProvider::create(
            &dir.path().join("x"),
            &pass,
            KdfParams {
                memory_kib: 1,
                iterations: 1,
                parallelism: 1,
            },
        )
        .unwrap_err(),
    );
    // A wrong label, and a wrong key, on a real wrapped DEK.
    let dek_record = &zone.records()[1];
    let kek = Kek::from_slice(&kek_plain).unwrap();
    let mut bad_label = dek_record.label();
    bad_label.version = 9;
    errors
        .push(wrap::unwrap(&kek, &bad_label, dek_record.wrapped.as_deref().unwrap()).unwrap_err());
    errors.push(
        wrap::unwrap(
            &Kek::generate(),
            &dek_record.label(),
            dek_record.wrapped.as_deref().unwrap(),
        )
        .unwrap_err(),
    );
    // An empty key to wrap.
    errors.push(wrap::wrap(&kek, &dek_record.label(), &[]).unwrap_err());
    // A zone file whose fields hold secrets where the parser chokes: serde's
    // own messages would quote them.
    let text = std::fs::read_to_string(&zone_path).unwrap();
    let dek_b64 = Base64::encode_string(dek1.expose());
    let poisoned = text.replacen("\"active\"", &format!("\"{dek_b64}\""), 1);
    std::fs::write(dir.path().join("poison.json"), poisoned).unwrap();
    errors.push(ZoneKeyFile::load(&dir.path().join("poison.json")).unwrap_err());
    let poisoned = text.replacen("\"zone\": 7", &format!("\"zone\": \"{PASS}\""), 1);
    std::fs::write(dir.path().join("poison2.json"), poisoned).unwrap();
    errors.push(ZoneKeyFile::load(&dir.path().join("poison2.json")).unwrap_err());
    std::fs::write(
        dir.path().join("poison3.json"),
        format!("{{\"{PASS}\": 1}}"),
    )
    .unwrap();
    errors.push(ZoneKeyFile::load(&dir.path().join("poison3.json")).unwrap_err());
    std::fs::write(
        dir.path().join("poison4.json"),
        format!("{{\"format\": \"{PASS}\""),
    )
    .unwrap();
    errors.push(SealedFileProvider::open(&dir.path().join("poison4.json"), &pass).unwrap_err());
    // Another root: the KEK does not unwrap.
    let other =
        SealedFileProvider::create(&dir.path().join("other"), &wrong, KdfParams::INSECURE_FAST)
            .unwrap();
    errors.push(zone.unlock(&other).unwrap_err());
    // A second pre-active DEK.
    let mut z2 = zone.clone();
    errors.push(z2.add_dek_version(&provider).unwrap_err());
    // Passphrase problems, including a file holding the passphrase plus junk.
    let pf = dir.path().join("pass");
    let mut bytes = PASS.as_bytes().to_vec();
    bytes.push(0xff);
    std::fs::write(&pf, &bytes).unwrap();
    errors.push(Passphrase::resolve(Some(&pf), "KEYTURN_TEST_UNSET_VAR", false).unwrap_err());
    errors.push(Passphrase::resolve(None, "KEYTURN_TEST_UNSET_VAR_2", false).unwrap_err());
    errors.push(Passphrase::new(String::new()).unwrap_err());
    // I/O: a directory where the file should go.
    errors.push(zone.save(dir.path()).unwrap_err());

    let kinds: std::collections::HashSet<_> = errors.iter().map(std::mem::discriminant).collect();
    assert!(
        kinds.len() >= 11,
        "only {} error kinds exercised",
        kinds.len()
    );
    for e in &errors {
        texts.push(full_text(e));
    }

    for t in &texts {
        for n in &forbidden {
            assert!(!t.contains(n.as_str()), "secret {n:?} leaked into: {t}");
        }
    }
}

/// The same for a root key rotation: the old and the new root key, the old
/// and the new passphrase, in every Debug string and error on the way.
#[test]
fn no_secrets_in_root_rotation_errors_or_debug() {
    use super::root_rotation::{RootPair, RootRotationState, UnsealedRoot};
    use crate::config::RootKeyConfig;

    const NEW_PASS: &str = "a brand new passphrase 77";
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("keys")).unwrap();
    let pass = Passphrase::new(PASS.into()).unwrap();
    let new_pass = Passphrase::new(NEW_PASS.into()).unwrap();
    let old_path = dir.path().join("keys/root.sealed");
    let old = SealedFileProvider::create(&old_path, &pass, KdfParams::INSECURE_FAST).unwrap();
    let old_root = old.root_for_tests().expose().to_vec();
    let new_root = RootKey::generate();
    let new_bytes = new_root.expose().to_vec();
    let mut zone = ZoneKeyFile::create(&old, ZoneId(3), "rot").unwrap();

    let sealed = |p: &str| RootKeyConfig::SealedFile { path: p.into() };
    let state = RootRotationState::new(
        sealed("keys/root.sealed"),
        sealed("keys/root-2.sealed"),
        1,
        Some((&new_root, &old)),
    )
    .unwrap();
    state.create(dir.path()).unwrap();

    let mut texts: Vec<String> = vec![format!("{state:?}")];
    let mut errors: Vec<KeyError> = Vec::new();
    // Re-wrapping without a rotation; the record unwrapped by another root.
    errors.push(zone.rewrap_root_batch(&old, 1).unwrap_err());
    let stranger = SealedFileProvider::create(
        &dir.path().join("stranger"),
        &new_pass,
        KdfParams::INSECURE_FAST,
    )
    .unwrap();
    errors.push(state.new_root(&stranger).err().unwrap());

    let pair = RootPair::new(
        state.old_id(),
        std::sync::Arc::new(SealedFileProvider::open(&old_path, &pass).unwrap()),
        state.new_id(),
        std::sync::Arc::new(UnsealedRoot::new(
            state.new_root(&old).unwrap().unwrap(),
            "new root".into(),
        )),
    );
    zone.rewrap_root_batch(&pair, 8).unwrap();
    texts.push(format!("{pair:?}"));
    texts.push(pair.describe());
    texts.push(format!("{:?}", zone.records()));
    // The old root alone no longer unwraps the re-wrapped KEK.
    errors.push(zone.check_keks_unwrap(&old).unwrap_err());
    errors.push(zone.unlock(&old).unwrap_err());
    // The new root key sealed under the new passphrase; opened with the old.
    let new_file = SealedFileProvider::seal_root(
        &dir.path().join("keys/root-2.sealed"),
        &new_pass,
        KdfParams::INSECURE_FAST,
        state.new_root(&old).unwrap().unwrap(),
    )
    .unwrap();
    texts.push(format!("{new_file:?}"));
    errors
        .push(SealedFileProvider::open(&dir.path().join("keys/root-2.sealed"), &pass).unwrap_err());
    // A record whose fields hold secrets where the parser chokes.
    let path = RootRotationState::path(dir.path());
    let text = std::fs::read_to_string(&path).unwrap();
    let new_b64 = Base64::encode_string(&new_bytes);
    std::fs::write(
        &path,
        text.replacen("\"version\": 1", &format!("\"version\": \"{new_b64}\""), 1),
    )
    .unwrap();
    errors.push(RootRotationState::load(dir.path()).unwrap_err());
    std::fs::write(
        &path,
        text.replacen("\"keyturn-root-rotation\"", &format!("\"{NEW_PASS}\""), 1),
    )
    .unwrap();
    errors.push(RootRotationState::load(dir.path()).unwrap_err());
    for e in &errors {
        texts.push(full_text(e));
    }
    assert!(errors.len() >= 7);

    let mut forbidden: Vec<String> = [old_root.as_slice(), new_bytes.as_slice()]
        .iter()
        .flat_map(|s| needles(s))
        .collect();
    forbidden.extend([PASS.to_string(), NEW_PASS.to_string(), "brand new".into()]);
    for t in &texts {
        for n in &forbidden {
            assert!(!t.contains(n.as_str()), "secret {n:?} leaked into: {t}");
        }
    }
}
