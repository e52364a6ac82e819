//! An erase certificate as a printable HTML page, for the people who file them.
//! Only verified certificates are rendered; every value is HTML-escaped.

use serde_json::Value;
use std::fmt::Write as _;

fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_owned(),
            '<' => "&lt;".to_owned(),
            '>' => "&gt;".to_owned(),
            '"' => "&quot;".to_owned(),
            '\'' => "&#39;".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

fn when(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else { return "—".into() };
    // Civil UTC from Unix milliseconds (days-from-civil inverse), without a date crate.
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn bytes(v: &Value) -> String {
    let n = v.as_u64().unwrap_or(0);
    format!("{n} bytes ({:.2} GiB)", n as f64 / f64::from(1u32 << 30))
}

fn row(out: &mut String, k: &str, v: &str) {
    let _ = writeln!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
}

/// The page.
pub fn render(c: &Value, sha256: &str, key: &str) -> String {
    let dev = &c["device"];
    let san = &c["sanitization"];
    let ver = &c["verification"];
    let pass = ver["result"] == "pass";
    let mut p = String::new();
    let _ = write!(
        p,
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Erase certificate {serial}</title>
<style>
 body {{ font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1b2430; margin: 0; background: #eef1f5; }}
 .page {{ max-width: 820px; margin: 32px auto; background: #fff; padding: 40px 48px; box-shadow: 0 2px 12px rgba(0,0,0,.12); }}
 header {{ display: flex; justify-content: space-between; align-items: flex-start; border-bottom: 3px solid #1f4e79; padding-bottom: 16px; }}
 h1 {{ font-size: 26px; margin: 0 0 4px; color: #1f4e79; }}
 .sub {{ color: #5b6675; font-size: 13px; }}
 .stamp {{ font-weight: bold; font-size: 20px; padding: 10px 18px; border: 3px solid {color}; color: {color}; border-radius: 6px; transform: rotate(-4deg); }}
 h2 {{ font-size: 15px; text-transform: uppercase; letter-spacing: .06em; color: #1f4e79; margin: 26px 0 8px; }}
 table {{ width: 100%; border-collapse: collapse; font-size: 14px; }}
 th {{ text-align: left; width: 34%; color: #5b6675; font-weight: normal; padding: 6px 8px; vertical-align: top; }}
 td {{ padding: 6px 8px; border-bottom: 1px solid #e3e7ec; overflow-wrap: break-word; }}
 .mono {{ font-family: "DejaVu Sans Mono", monospace; font-size: 12px; overflow-wrap: anywhere; }}
 footer {{ margin-top: 30px; font-size: 12px; color: #5b6675; border-top: 1px solid #e3e7ec; padding-top: 12px; }}
</style></head><body><div class="page">
<header><div><h1>Certificate of Media Sanitization</h1>
<div class="sub">Serial {serial} &middot; following {standards}</div></div>
<div class="stamp">{verdict}</div></header>
"#,
        serial = esc(&text(&c["serial"])),
        standards = esc(&c["standards"]
            .as_array()
            .map(|a| a.iter().map(text).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()),
        color = if pass { "#1e7b34" } else { "#b3261e" },
        verdict = if pass { "VERIFIED ZERO" } else { "FAILED" },
    );
    p.push_str("<h2>Device</h2><table>\n");
    row(&mut p, "Disk", &format!("{} (id {})", text(&dev["disk_name"]), text(&dev["disk_id"])));
    row(
        &mut p,
        "Storage node",
        &format!(
            "{} (id {}), failure domain {}",
            text(&dev["node_name"]),
            text(&dev["node_id"]),
            text(&dev["failure_domain"])
        ),
    );
    row(&mut p, "Path", &text(&dev["path"]));
    row(&mut p, "Kind", &text(&dev["kind"]));
    row(&mut p, "Size", &bytes(&dev["size_bytes"]));
    if let Some(id) = dev["identity"].as_object() {
        for (k, v) in id {
            row(&mut p, &format!("Identity: {k}"), &text(v));
        }
    }
    p.push_str("</table><h2>Sanitization</h2><table>\n");
    row(&mut p, "Category (SP 800-88)", &text(&san["category"]));
    row(&mut p, "Scope", &text(&san["scope"]));
    row(&mut p, "Technique", &text(&san["technique"]));
    row(&mut p, "Device primitive", &text(&san["device_primitive"]));
    row(&mut p, "Bytes overwritten", &bytes(&san["bytes_written"]));
    row(&mut p, "Tool", &format!("{} {}", text(&san["tool"]), text(&san["tool_version"])));
    row(&mut p, "Started", &when(&c["started_ms"]));
    row(&mut p, "Finished", &when(&c["finished_ms"]));
    p.push_str("</table><h2>Verification</h2><table>\n");
    row(&mut p, "Method", &text(&ver["method"]));
    row(&mut p, "Bytes checked", &bytes(&ver["bytes_checked"]));
    row(&mut p, "Bytes not zero", &text(&ver["mismatched_bytes"]));
    row(&mut p, "Result", &text(&ver["result"]));
    p.push_str("</table><h2>Responsibility</h2><table>\n");
    row(&mut p, "Requested by", &text(&c["operator"]));
    row(&mut p, "Reported by", &text(&c["reported_by"]));
    row(&mut p, "Issued", &when(&c["issued_ms"]));
    row(&mut p, "Metadata voters", &text(&c["cluster"]["meta_voters"]));
    p.push_str("</table>\n");
    let _ = write!(
        p,
        r#"<footer>Signed by the cluster's metadata service (ed25519). Verify the signed file offline with
<span class="mono">slate certificate verify FILE --verifying-key KEY</span>; its SHA-256 is recorded in the cluster's audit chain.
<table><tr><th>Body SHA-256</th><td class="mono">{}</td></tr><tr><th>Verifying key</th><td class="mono">{}</td></tr></table></footer>
</div></body></html>
"#,
        esc(sha256),
        esc(key)
    );
    p
}
