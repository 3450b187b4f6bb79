//! HdrHistogram's percentile-distribution text, as `--hdr-out` writes it.

#[derive(Clone, Debug)]
pub struct HdrSummary {
    pub rows: usize,
    pub total_count: u64,
    pub max: f64,
}

/// Parses HdrHistogram's percentile-distribution text: a header line
/// `Value Percentile TotalCount 1/(1-Percentile)`, rows of those numbers (the last column may
/// be missing or `inf` on the 100 % row), and a `#[Max = ..., Total count = ...]` footer.
pub fn parse_hdr_percentiles(text: &str) -> Result<HdrSummary, String> {
    let mut header = false;
    let mut rows = 0usize;
    let mut last: Option<(f64, f64, u64)> = None;
    let mut max = None;
    let mut footer_total = None;
    for (no, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if let Some(body) = t.strip_prefix("#[") {
            let body = body.trim_end_matches(']');
            for part in body.split(',') {
                let mut kv = part.splitn(2, '=');
                let k = kv.next().unwrap_or("").trim();
                let v = kv.next().unwrap_or("").trim();
                match k {
                    "Max" => {
                        max = Some(
                            v.parse::<f64>()
                                .map_err(|e| format!("line {}: Max {v:?}: {e}", no + 1))?,
                        )
                    }
                    "Total count" => {
                        footer_total = Some(
                            v.parse::<u64>()
                                .map_err(|e| format!("line {}: Total count {v:?}: {e}", no + 1))?,
                        )
                    }
                    _ => {}
                }
            }
            continue;
        }
        if t.starts_with('#') {
            continue;
        }
        if t.contains("Value") && t.contains("Percentile") {
            if !t.contains("TotalCount") {
                return Err(format!("line {}: header without TotalCount: {t:?}", no + 1));
            }
            header = true;
            continue;
        }
        if !header {
            return Err(format!("line {}: data before the header: {t:?}", no + 1));
        }
        let cols: Vec<&str> = t.split_whitespace().collect();
        if !(3..=4).contains(&cols.len()) {
            return Err(format!("line {}: expected 3 or 4 columns: {t:?}", no + 1));
        }
        let value: f64 = cols[0]
            .parse()
            .map_err(|e| format!("line {}: value {:?}: {e}", no + 1, cols[0]))?;
        let pct: f64 = cols[1]
            .parse()
            .map_err(|e| format!("line {}: percentile {:?}: {e}", no + 1, cols[1]))?;
        let count: u64 = cols[2]
            .parse()
            .map_err(|e| format!("line {}: count {:?}: {e}", no + 1, cols[2]))?;
        if let Some(c) = cols.get(3) {
            let lc = c.to_ascii_lowercase();
            if lc != "inf" && lc != "infinity" {
                c.parse::<f64>()
                    .map_err(|e| format!("line {}: 1/(1-p) {c:?}: {e}", no + 1))?;
            }
        }
        if !(0.0..=1.0).contains(&pct) {
            return Err(format!("line {}: percentile {pct} outside [0, 1]", no + 1));
        }
        if let Some((v0, p0, c0)) = last {
            if value < v0 || pct < p0 || count < c0 {
                return Err(format!("line {}: not monotonic: {t:?}", no + 1));
            }
        }
        last = Some((value, pct, count));
        rows += 1;
    }
    if !header {
        return Err("no `Value Percentile TotalCount 1/(1-Percentile)` header".into());
    }
    let max = max.ok_or("no `#[Max = ...` footer")?;
    let total_count = match (footer_total, last) {
        (Some(t), Some((_, _, c))) if t != c => return Err(format!("footer total count {t} != last row's count {c}")),
        (Some(t), _) => t,
        (None, Some((_, _, c))) => c,
        (None, None) => 0,
    };
    Ok(HdrSummary { rows, total_count, max })
}
