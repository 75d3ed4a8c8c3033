//! A [`Report`] as Markdown or as one self-contained HTML page.

use super::Report;

/// Output formats.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The report's data, JSON.
    Json,
    /// Markdown tables.
    Md,
    /// One HTML page, no external assets.
    Html,
}

impl Format {
    /// The file name extension of this format.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Md => "md",
            Format::Html => "html",
        }
    }
}

/// Renders `r` as `format`.
pub fn render(r: &Report, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(r).expect("a report serialises") + "\n",
        Format::Md => markdown(r),
        Format::Html => html(r),
    }
}

/// One section: title, column headings, rows of cells.
type Table = (String, Vec<&'static str>, Vec<Vec<String>>);

/// The report's sections, shared by both text formats.
fn tables(r: &Report) -> Vec<Table> {
    let mut out = Vec::new();
    for z in &r.zones {
        out.push((
            format!("Zone {}: keys", z.zone),
            vec![
                "key",
                "purpose",
                "version",
                "state",
                "age (days)",
                "content blocks",
            ],
            z.keys
                .iter()
                .map(|k| {
                    vec![
                        k.id.clone(),
                        k.purpose.clone(),
                        k.version.to_string(),
                        k.state.clone(),
                        format!("{:.1}", k.age_days),
                        k.content_blocks.map_or("-".into(), |b| b.to_string()),
                    ]
                })
                .collect(),
        ));
        out.push((
            format!("Zone {}: keys due or overdue", z.zone),
            vec!["key", "urgency", "age (days)", "cryptoperiod (days)"],
            z.overdue
                .iter()
                .map(|o| {
                    vec![
                        o.key.clone(),
                        o.urgency.clone(),
                        format!("{:.1}", o.age_days),
                        format!("{:.1}", o.period_days),
                    ]
                })
                .collect(),
        ));
    }
    out.push((
        "Rotations".into(),
        vec![
            "zone",
            "kind",
            "key",
            "started",
            "ended",
            "duration (ms)",
            "outcome",
            "events",
        ],
        r.rotations
            .iter()
            .map(|x| {
                vec![
                    x.zone.clone().unwrap_or_else(|| "-".into()),
                    x.kind.into(),
                    x.key.clone().unwrap_or_else(|| "-".into()),
                    x.started.clone(),
                    x.ended.clone().unwrap_or_else(|| "-".into()),
                    x.duration_ms.map_or("-".into(), |d| d.to_string()),
                    x.outcome.into(),
                    x.events
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(" "),
                ]
            })
            .collect(),
    ));
    out.push((
        "Approvals".into(),
        vec!["event", "time", "action", "outcome", "zone", "approvers"],
        r.approvals
            .iter()
            .map(|a| {
                vec![
                    a.event.to_string(),
                    a.time.clone(),
                    a.action.clone(),
                    format!("{:?}", a.outcome).to_lowercase(),
                    a.zone.clone().unwrap_or_else(|| "-".into()),
                    a.approvers.join(", "),
                ]
            })
            .collect(),
    ));
    out
}

fn audit_line(r: &Report) -> String {
    let a = &r.audit;
    match (&a.problem, a.signed) {
        (None, true) => format!(
            "intact: {} records, every one covered by a valid signature",
            a.records
        ),
        (None, false) => format!(
            "chain intact: {} records (the pool has no signing key)",
            a.records
        ),
        (Some(p), _) => format!("FAILED: {p}"),
    }
}

fn markdown(r: &Report) -> String {
    // Table cells: no pipes or line breaks from the data.
    let cell = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    let mut s = format!(
        "# keyturn key rotation report\n\nPeriod: {} to {} (generated {})\n\nAudit chain: {}\n",
        r.from,
        r.to,
        r.generated,
        audit_line(r)
    );
    for (title, header, rows) in tables(r) {
        s.push_str(&format!("\n## {}\n\n", cell(&title)));
        if rows.is_empty() {
            s.push_str("(none)\n");
            continue;
        }
        s.push_str(&format!("| {} |\n", header.join(" | ")));
        s.push_str(&format!("|{}\n", "---|".repeat(header.len())));
        for row in rows {
            let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
            s.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
    }
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(r: &Report) -> String {
    let mut s = String::from(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>keyturn key rotation report</title>\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}\
         td,th{border:1px solid #999;padding:.2em .6em;text-align:left}.bad{color:#b00}</style></head><body>\n",
    );
    s.push_str(&format!(
        "<h1>keyturn key rotation report</h1>\n<p>Period: {} to {} (generated {})</p>\n<p id=\"audit\" class=\"{}\">Audit chain: {}</p>\n",
        esc(&r.from),
        esc(&r.to),
        esc(&r.generated),
        if r.audit.ok { "ok" } else { "bad" },
        esc(&audit_line(r))
    ));
    for (title, header, rows) in tables(r) {
        s.push_str(&format!("<h2>{}</h2>\n", esc(&title)));
        if rows.is_empty() {
            s.push_str("<p>(none)</p>\n");
            continue;
        }
        s.push_str("<table><tr>");
        for h in header {
            s.push_str(&format!("<th>{}</th>", esc(h)));
        }
        s.push_str("</tr>\n");
        for row in rows {
            s.push_str("<tr>");
            for c in row {
                s.push_str(&format!("<td>{}</td>", esc(&c)));
            }
            s.push_str("</tr>\n");
        }
        s.push_str("</table>\n");
    }
    s.push_str("</body></html>\n");
    s
}
