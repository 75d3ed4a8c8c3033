//! `keyturn demo`: create (or reuse) a demo pool and serve it, and what it
//! tells a person once it serves: commands to try, each naming this program
//! the way they can run it again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use super::init::new_admin_token;
use super::secret::Secret;
use super::serve::{Listen, serve};
use super::{DEMO_PASS_FILE, PASS_ENV, default_profile, write_secret_file};
use crate::config::{DualControlSection, ServerSection};
use crate::keys::passphrase::Passphrase;
use crate::keys::sealed::KdfParams;
use crate::pool::{InitOptions, Pool, RootKeyChoice};

/// The hints printed before the ready line: clients to try, how to rotate
/// the demo zone's key, and how to serve the same pool again. `bin` is this
/// program as the user can run it (see [`shown_exe`]).
pub(super) fn hints(uri: &str, dir: &Path, bin: &str) -> String {
    let dir = shell_word(&dir.display().to_string());
    format!(
        "keyturn demo: NBD URI {uri}\n\
         \x20 try: nbdinfo {uri}\n\
         \x20      qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}\n\
         \x20 rotate its key: {bin} rotate prepare --pool {dir} --zone demo\n\
         \x20      then `rotate flip` and `rotate status` with the same --pool and --zone\n\
         \x20 serve it again (the pool stays in {dir}): {bin} demo --dir {dir}\n"
    )
}

/// This program as the user can run it again: the bare name when the
/// shell found it on PATH (no slash in argv[0]), else the running
/// executable's path, relative to the current directory when inside it
/// (`target/release/keyturn` after `cargo run --release` in the source tree).
pub(super) fn shown_exe() -> String {
    let argv0 = std::env::args_os().next();
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    shell_word(&shown_exe_from(
        argv0.as_deref(),
        exe.as_deref(),
        cwd.as_deref(),
    ))
}

fn shown_exe_from(argv0: Option<&OsStr>, exe: Option<&Path>, cwd: Option<&Path>) -> String {
    if let Some(a) = argv0
        && !a.is_empty()
        && !a.as_encoded_bytes().contains(&b'/')
    {
        return a.to_string_lossy().into_owned();
    }
    let Some(exe) = exe else {
        return "keyturn".to_owned();
    };
    match cwd.and_then(|c| exe.strip_prefix(c).ok()) {
        // A bare name would be looked up on PATH: keep it a path.
        Some(rel) if rel.components().count() == 1 => format!("./{}", rel.display()),
        Some(rel) if rel.components().count() > 1 => rel.display().to_string(),
        _ => exe.display().to_string(),
    }
}

/// `s` as one shell word: as it is when it has nothing a shell would
/// split or expand, else in single quotes.
fn shell_word(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%=".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[derive(Args, Debug)]
pub(super) struct DemoArgs {
    /// Pool directory; created with a demo pool if empty [default: a fresh temporary directory].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Also listen on this Unix socket.
    #[arg(long)]
    unix: Option<PathBuf>,
    /// Loopback address of the admin API [default: as for `serve`].
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
}

/// `keyturn demo`.
pub(super) fn demo(a: DemoArgs) -> Result<()> {
    let dir = match a.dir {
        Some(d) => d,
        None => {
            let d = std::env::temp_dir().join(format!("keyturn-demo-{}", std::process::id()));
            std::fs::create_dir_all(&d)
                .with_context(|| format!("cannot create {}", d.display()))?;
            d
        }
    };
    let pass_file = dir.join(DEMO_PASS_FILE);
    if !Pool::exists(&dir) {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let pass = {
            use rand::RngCore;
            let mut b = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut b);
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        };
        write_secret_file(&pass_file, &pass)?;
        let pass = Passphrase::new(pass)?;
        let opts = InitOptions {
            data: None,
            staging: None,
            kdf: KdfParams::default(),
            root_key: RootKeyChoice::SealedFile,
            server: ServerSection {
                listen: a.listen.clone(),
                ..ServerSection::default()
            },
            dual_control: DualControlSection::default(),
        };
        Pool::init(&dir, &opts, &pass)
            .with_context(|| format!("cannot create demo pool in {}", dir.display()))?;
        new_admin_token(&dir)?;
        let pool = Pool::open(&dir, &pass, &default_profile()?)?;
        pool.create_zone("demo")?;
        pool.create_volume("vol0", "demo", 1 << 30)?;
        eprintln!(
            "keyturn demo: created a pool in {} with zone 'demo' and a 1 GiB volume 'vol0'",
            dir.display()
        );
    } else {
        eprintln!(
            "keyturn demo: serving the pool already in {}",
            dir.display()
        );
    }
    let pass = Passphrase::resolve(Some(&pass_file), PASS_ENV, false)
        .with_context(|| format!("the demo keeps its passphrase in {}", pass_file.display()))?;
    let listen = Listen {
        nbd: Some(a.listen),
        unix: a.unix,
        admin: a.admin_listen,
        stream: None,
        nats: None,
        allow_plaintext: false,
    };
    serve(&dir, &Secret::Passphrase(pass), listen, None, Some(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(argv0: &str, exe: &str, cwd: &str) -> String {
        shown_exe_from(
            Some(OsStr::new(argv0)),
            Some(Path::new(exe)),
            Some(Path::new(cwd)),
        )
    }

    #[test]
    fn the_program_is_named_as_the_user_runs_it() {
        // `cargo run --release` in the source tree.
        assert_eq!(
            shown(
                "/src/keyturn/target/release/keyturn",
                "/src/keyturn/target/release/keyturn",
                "/src/keyturn"
            ),
            "target/release/keyturn"
        );
        // Found on PATH.
        assert_eq!(
            shown("keyturn", "/usr/local/bin/keyturn", "/home/me"),
            "keyturn"
        );
        // Run from elsewhere: the full path.
        assert_eq!(
            shown(
                "../k/target/release/keyturn",
                "/src/k/target/release/keyturn",
                "/tmp"
            ),
            "/src/k/target/release/keyturn"
        );
        // In the current directory itself.
        assert_eq!(
            shown("./keyturn", "/opt/kt/keyturn", "/opt/kt"),
            "./keyturn"
        );
        assert_eq!(shown_exe_from(None, None, None), "keyturn");
    }

    #[test]
    fn odd_paths_stay_one_shell_word() {
        assert_eq!(shell_word("/tmp/keyturn-demo-42"), "/tmp/keyturn-demo-42");
        assert_eq!(shell_word("/tmp/my demo"), "'/tmp/my demo'");
        assert_eq!(shell_word("/tmp/it's"), r"'/tmp/it'\''s'");
    }

    #[test]
    fn hints_name_the_program_and_the_pool() {
        let h = hints(
            "nbd://127.0.0.1:10809/vol0",
            Path::new("/tmp/d"),
            "target/release/keyturn",
        );
        assert!(
            h.contains(
                "  rotate its key: target/release/keyturn rotate prepare --pool /tmp/d --zone demo\n"
            ),
            "{h}"
        );
        assert!(
            h.ends_with(
                "  serve it again (the pool stays in /tmp/d): target/release/keyturn demo --dir /tmp/d\n"
            ),
            "{h}"
        );
        assert!(h.starts_with("keyturn demo: NBD URI nbd://127.0.0.1:10809/vol0\n  try: nbdinfo "));
    }
}
