//! Inspection commands that read a pool without changing it: `keys list`,
//! `keys show` and `check`. When a server answers for the pool they ask it
//! (its admin API: no passphrase, and the pool lock it holds is no
//! obstacle); otherwise they open the pool here, as before.

use anyhow::{Context, Result, bail};

use super::PoolArgs;
use super::api::Admin;
use crate::admin::{CheckReport, KeyInfo};

/// `keys list`.
pub(super) fn list(pool: &PoolArgs, zone: Option<&str>, json: bool) -> Result<()> {
    let rows = Admin::open_quietly(pool)?.keys(zone)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    print!("{}", key_table(&rows));
    Ok(())
}

/// The table `keys list` prints.
fn key_table(rows: &[KeyInfo]) -> String {
    let mut out = format!(
        "{:<12} {:<16} {:<5} {:>3} {:<13} {:>8} {:>8} {:>12}\n",
        "ZONE", "ID", "KIND", "VER", "STATE", "AGE(d)", "WRAPPED", "BLOCKS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<12} {:<16} {:<5} {:>3} {:<13} {:>8.1} {:>8} {:>12}\n",
            r.zone,
            r.id,
            r.purpose,
            r.version,
            r.state,
            r.age_days,
            r.wrapped_by_kek
                .map_or("root".into(), |v| format!("kek-v{v}")),
            r.content_blocks.map_or("-".into(), |b| b.to_string())
        ));
    }
    out
}

/// `keys show ID`.
pub(super) fn show(pool: &PoolArgs, key: &str) -> Result<()> {
    let row = Admin::open_quietly(pool)?
        .keys(None)?
        .into_iter()
        .find(|r| r.id == key)
        .with_context(|| format!("no key with id {key:?}"))?;
    println!("{}", serde_json::to_string_pretty(&row)?);
    Ok(())
}

/// `check`: fails when the report lists any problem.
pub(super) fn check(pool: &PoolArgs, json: bool) -> Result<()> {
    let report = Admin::open_quietly(pool)?.check()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", check_text(&report));
    }
    if !report.problems.is_empty() {
        bail!(
            "{} problems found in pool {}",
            report.problems.len(),
            pool.pool.display()
        );
    }
    Ok(())
}

/// What `check` prints without `--json`.
fn check_text(r: &CheckReport) -> String {
    let mut out = format!(
        "{} mapped blocks, {} content blocks, {} data slots in use\n",
        r.mapped_blocks, r.content_blocks, r.used_slots
    );
    for p in &r.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_rows_line_up_under_their_headings() {
        let row = KeyInfo {
            zone: "z1".into(),
            id: "z1-dek-v2".into(),
            purpose: "dek".into(),
            version: 2,
            state: "active".into(),
            age_days: 1.25,
            wrapped_by_kek: Some(1),
            wrapped_by_root: None,
            content_blocks: Some(16384),
            created_unix: 0,
            activated_unix: None,
            deactivated_unix: None,
            destroyed_unix: None,
        };
        let kek = KeyInfo {
            id: "z1-kek-v1".into(),
            purpose: "kek".into(),
            version: 1,
            wrapped_by_kek: None,
            content_blocks: None,
            ..row.clone()
        };
        let table = key_table(&[row, kek]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines,
            [
                "ZONE         ID               KIND  VER STATE           AGE(d)  WRAPPED       BLOCKS",
                "z1           z1-dek-v2        dek     2 active             1.2   kek-v1        16384",
                "z1           z1-kek-v1        kek     1 active             1.2     root            -",
            ]
        );
    }

    #[test]
    fn check_text_lists_each_problem() {
        let r = CheckReport {
            mapped_blocks: 3,
            content_blocks: 2,
            used_slots: 2,
            problems: vec!["one".into(), "two".into()],
        };
        assert_eq!(
            check_text(&r),
            "3 mapped blocks, 2 content blocks, 2 data slots in use\nproblem: one\nproblem: two\n"
        );
    }
}
