//! `--format html`: the report as one self-contained page for people: the
//! verdict, root, hints and reference check on top; the error along the
//! depth; each diagnosed failure with its worst elements, a per-channel
//! error strip and an error histogram; the layers, blocks and stages as a
//! collapsible tree coloured by error relative to the tolerance; and a
//! table of every stage that sorts and filters. No request of any kind:
//! CSS, script and SVG are inline, and without script the summary, tree
//! (`<details>`) and table still read.

use std::fmt::Write as _;

use super::{plot, tolerance_used, GroupSummary, Report, RunMode, StageReport};
use crate::diagnosis::Origin;
use crate::metrics::{Comparison, FailureDetail, Verdict};

/// The page, as one string.
pub fn render(report: &Report) -> String {
    let mut page = String::with_capacity(256 * 1024);
    let s = &report.summary;
    let verdict = verdict_badge(s.verdict);
    let _ = write!(
        page,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>verify {}: {}</title><style>{STYLE}</style></head><body>\n",
        escape(&report.model),
        if s.verdict == Verdict::Succ {
            "succ"
        } else {
            "fail"
        }
    );
    let _ = writeln!(
        page,
        "<header><h1>verify {} {verdict}</h1><p class=\"meta\">reference <code>{}</code> against <code>{}</code>; mode {}; tolerance: {}</p></header>",
        escape(&report.model),
        escape(&report.reference),
        escape(&report.candidate),
        mode_words(report.mode),
        escape(&report.tolerance.describe())
    );
    summary(&mut page, report);
    page.push_str("<section id=\"plot\"><h2>Error along the depth</h2>");
    match plot::svg(report) {
        Ok(svg) => page.push_str(&svg),
        Err(reason) => {
            let _ = write!(page, "<p>(no plot: {})</p>", escape(&reason));
        }
    }
    page.push_str("</section>\n");
    failures(&mut page, report);
    tree(&mut page, report);
    table(&mut page, report);
    let _ = writeln!(page, "<script>{SCRIPT}</script>\n</body></html>");
    page
}

fn summary(page: &mut String, report: &Report) {
    let s = &report.summary;
    page.push_str("<section id=\"summary\"><h2>Summary</h2><ul>");
    let check = &report.reference_check;
    match check.message() {
        Some(message) => {
            let _ = write!(
                page,
                "<li class=\"warning\">reference check: {}</li>",
                escape(&message)
            );
        }
        None => {
            let _ = write!(
                page,
                "<li>reference check: eval mode ({})</li>",
                crate::reference_check::eval_mode_evidence(&check.evidence)
            );
        }
    }

    let _ = write!(
        page,
        "<li>{} stages compared: <strong>{} succ</strong>, <strong>{} fail</strong>; first failure: {}</li>",
        s.compared,
        s.succ,
        s.fail,
        stage_link(s.first_failure.as_deref())
    );
    if let Some(root) = &s.root {
        let _ = write!(
            page,
            "<li class=\"root\">root: {} ({})</li>",
            stage_link(Some(root)),
            super::root_words(s)
        );
    }
    if !s.introduced_at.is_empty() {
        let names: Vec<String> = s
            .introduced_at
            .iter()
            .map(|name| stage_link(Some(name)))
            .collect();
        let _ = write!(
            page,
            "<li>error introduced at ({}): {}</li>",
            names.len(),
            names.join(", ")
        );
    }
    if let Some(hint) = &s.hint {
        let _ = write!(
            page,
            "<li class=\"hint\">hint: {}</li>",
            escape(&hint.message)
        );
    }
    // The same hint at many stages (a train-mode reference) is said once,
    // with the stages it holds at.
    let mut hints: Vec<(&str, Vec<&str>)> = Vec::new();
    for stage in &report.stages {
        for hint in &stage.hints {
            match hints
                .iter_mut()
                .find(|(message, _)| *message == hint.message)
            {
                Some((_, stages)) => stages.push(&stage.name),
                None => hints.push((&hint.message, vec![&stage.name])),
            }
        }
    }
    for (message, stages) in hints {
        let shown: Vec<String> = stages
            .iter()
            .take(8)
            .map(|name| stage_link(Some(name)))
            .collect();
        let more = match stages.len() {
            0..=8 => String::new(),
            count => format!(" and {} more", count - 8),
        };
        let _ = write!(
            page,
            "<li class=\"hint\">hint at {}{more}: {}</li>",
            shown.join(", "),
            escape(message)
        );
    }
    if let Some(stopped) = &s.stopped {
        let _ = write!(page, "<li>stopped: {}</li>", escape(stopped));
    }
    if s.fail > 0 {
        let _ = write!(
            page,
            "<li>tolerance needed: {}</li>",
            escape(&super::tolerance_needed_words(report))
        );
    }
    if let Some(items) = &s.items {
        let _ = write!(
            page,
            "<li>images: {}, top-1 agree {}/{}, top-5 sets agree {}/{}</li>",
            items.items, items.top1_agree, items.classified, items.top5_agree, items.classified
        );
    }
    page.push_str("</ul></section>\n");
}

/// Each failure looked at closely: hints, worst elements, channel strip, histogram.
fn failures(page: &mut String, report: &Report) {
    let detailed: Vec<&StageReport> = report
        .stages
        .iter()
        .filter(|stage| stage.detail.is_some())
        .collect();
    if detailed.is_empty() {
        return;
    }
    page.push_str("<section id=\"failures\"><h2>Failures, up close</h2>");
    for stage in detailed {
        let detail = stage.detail.as_ref().expect("filtered");
        let _ = write!(
            page,
            "<article class=\"failure\" id=\"failure-{}\"><h3>{} <small>{}</small> {}</h3>",
            anchor(&stage.name),
            escape(&stage.name),
            escape(stage.module_type.as_str()),
            verdict_badge(stage.verdict)
        );
        if let Some(origin) = &stage.origin {
            let _ = write!(page, "<p>origin: {}</p>", origin_words(origin, report.mode));
        }
        for hint in &stage.hints {
            let _ = write!(
                page,
                "<p class=\"hint\">hint: {}</p>",
                escape(&hint.message)
            );
        }
        worst_table(page, detail);
        channel_strip(page, detail);
        histogram(page, detail);
        page.push_str("</article>");
    }
    page.push_str("</section>\n");
}

fn worst_table(page: &mut String, detail: &FailureDetail) {
    page.push_str("<table class=\"worst\"><caption>worst elements</caption><thead><tr><th>index (NCHW)</th><th>reference</th><th>candidate</th><th>|cand &minus; ref|</th></tr></thead><tbody>");
    for element in &detail.worst {
        let _ = write!(
            page,
            "<tr><td>{:?}</td><td>{:e}</td><td>{:e}</td><td>{:.3e}</td></tr>",
            element.index,
            element.reference,
            element.candidate,
            (element.candidate as f64 - element.reference as f64).abs()
        );
    }
    page.push_str("</tbody></table>");
}

/// One bar per output channel, its height the channel's largest error: one
/// SVG path, so that 2048 channels stay a few kilobytes.
fn channel_strip(page: &mut String, detail: &FailureDetail) {
    let errors = &detail.channel_max_error;
    let largest = errors
        .iter()
        .copied()
        .filter(|e| e.is_finite())
        .fold(0f64, f64::max);
    let (width, height) = (720.0, 60.0);
    let bar = width / errors.len().max(1) as f64;
    let mut path = String::with_capacity(errors.len() * 24);
    for (channel, &error) in errors.iter().enumerate() {
        let fraction = if error.is_finite() {
            error / largest.max(f64::MIN_POSITIVE)
        } else {
            1.0
        };
        let h = (fraction * height).max(if error > 0.0 { 1.0 } else { 0.0 });
        if h > 0.0 {
            let _ = write!(
                path,
                "M{:.1} {height}v-{h:.1}h{:.2}v{h:.1}z",
                channel as f64 * bar,
                bar.max(0.5)
            );
        }
    }
    let _ = write!(
        page,
        "<figure class=\"strip\"><svg role=\"img\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" data-channels=\"{}\" aria-label=\"largest error per output channel\"><path class=\"channels\" d=\"{path}\"/></svg><figcaption>largest |cand &minus; ref| per output channel ({} channels, up to {largest:.3e}): a channel-order or BatchNorm-parameter mistake shows as a pattern</figcaption></figure>",
        errors.len(),
        errors.len()
    );
}

fn histogram(page: &mut String, detail: &FailureDetail) {
    let counts = &detail.histogram;
    let most = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let (width, height) = (720.0, 80.0);
    let bar = width / counts.len() as f64;
    let _ = write!(
        page,
        "<figure class=\"histogram\"><svg role=\"img\" viewBox=\"0 0 {width} {}\" width=\"{width}\" height=\"{}\" aria-label=\"error histogram\">",
        height + 16.0,
        height + 16.0
    );
    for (bucket, &count) in counts.iter().enumerate() {
        let label = match bucket {
            0 => "0".to_string(),
            16 => "&ge;1e3".to_string(),
            k => format!("1e{}", k as i32 - 13),
        };
        let h = count as f64 / most * height;
        let x = bucket as f64 * bar;
        let _ = write!(
            page,
            "<rect class=\"bucket\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\"><title>{label}: {count}</title></rect><text x=\"{:.1}\" y=\"{}\" font-size=\"9\">{label}</text>",
            x + 1.0,
            height - h,
            bar - 2.0,
            x + 2.0,
            height + 12.0
        );
    }
    page.push_str("</svg><figcaption>elements by |cand &minus; ref|, one bar per decade</figcaption></figure>");
}

/// Layers, blocks and stages as nested `<details>`, each row coloured by
/// its error relative to the tolerance.
fn tree(page: &mut String, report: &Report) {
    page.push_str("<section id=\"tree\"><h2>Layers, blocks and stages</h2><p class=\"legend\">");
    for (class, words) in [
        ("far", "&le; 0.1 of the tolerance"),
        ("near", "0.1 to 1"),
        ("over", "fail, up to 10x"),
        ("way-over", "fail, over 10x"),
    ] {
        let _ = write!(page, "<span class=\"swatch {class}\">{words}</span> ");
    }
    page.push_str("</p>");
    let group_of =
        |name: &str, groups: &[GroupSummary]| groups.iter().find(|g| g.name == name).cloned();
    let mut open_layer: Option<String> = None;
    let mut open_block: Option<String> = None;
    let close_block = |page: &mut String, open: &mut Option<String>| {
        if open.take().is_some() {
            page.push_str("</div></details>");
        }
    };
    for stage in &report.stages {
        // A container's own stage closes it; its children came before.
        let layer = stage
            .layer
            .clone()
            .or_else(|| stage.is_layer().then(|| stage.name.clone()));
        if open_layer != layer {
            close_block(page, &mut open_block);
            if open_layer.take().is_some() {
                page.push_str("</div></details>");
            }
            if let Some(layer) = &layer {
                let group = group_of(layer, &report.layers);
                let _ = write!(
                    page,
                    "<details class=\"layer\" open><summary>{}</summary><div>",
                    group_line(layer, group.as_ref())
                );
                open_layer = Some(layer.clone());
            }
        }
        let block = stage
            .block
            .clone()
            .or_else(|| stage.module_type.is_block().then(|| stage.name.clone()));
        if open_block != block {
            close_block(page, &mut open_block);
            if let Some(block) = &block {
                let group = group_of(block, &report.blocks);
                let failed = group.as_ref().and_then(|g| g.verdict) == Some(Verdict::Fail);
                let _ = write!(
                    page,
                    "<details class=\"block\"{}><summary>{}</summary><div>",
                    if failed { " open" } else { "" },
                    group_line(block, group.as_ref())
                );
                open_block = Some(block.clone());
            }
        }
        stage_row(page, report, stage);
    }
    close_block(page, &mut open_block);
    if open_layer.is_some() {
        page.push_str("</div></details>");
    }
    page.push_str("</section>\n");
}

fn group_line(name: &str, group: Option<&GroupSummary>) -> String {
    match group {
        Some(group) => format!(
            "<strong>{}</strong> {} stages {}/{} succ",
            escape(name),
            group.verdict.map(verdict_badge).unwrap_or_default(),
            group.stages.succ,
            group.stages.total
        ),
        None => format!("<strong>{}</strong>", escape(name)),
    }
}

fn stage_row(page: &mut String, report: &Report, stage: &StageReport) {
    let class = stage
        .primary()
        .map_or("missing", |c| closeness(report, stage, c));
    let numbers = |label: &str, comparison: Option<&Comparison>| match comparison {
        Some(c) => format!("{label}{:.2e}", c.relative_error),
        None => String::new(),
    };
    // With --both, cumulative and isolated side by side.
    let (first, second) = match report.mode {
        RunMode::Both => (
            numbers("cumulative ", stage.cumulative.as_ref()),
            format!(
                "<span class=\"err\">{}</span>",
                numbers("isolated ", stage.isolated.as_ref())
            ),
        ),
        _ => (numbers("", stage.primary()), String::new()),
    };
    let _ = write!(
        page,
        "<div class=\"stage {class}\" id=\"stage-{}\"><span class=\"name\">{}</span><span class=\"type\">{}</span>{}<span class=\"err\">{first}</span>{second}</div>",
        anchor(&stage.name),
        escape(&stage.name),
        escape(stage.module_type.as_str()),
        verdict_badge(stage.verdict),
    );
}

fn closeness(report: &Report, stage: &StageReport, comparison: &Comparison) -> &'static str {
    if comparison.verdict == Verdict::Fail && comparison.max_abs_error.is_nan() {
        return "way-over";
    }
    match tolerance_used(report, stage, comparison) {
        r if comparison.verdict == Verdict::Fail && r > 10.0 => "way-over",
        _ if comparison.verdict == Verdict::Fail => "over",
        r if r <= 0.1 => "far",
        _ => "near",
    }
}

/// Every stage, sortable and filterable with script, a plain table without.
fn table(page: &mut String, report: &Report) {
    let both = report.mode == RunMode::Both;
    page.push_str(
        "<section id=\"table\"><h2>Every stage</h2><p class=\"filters\"><label>name <input id=\"filter-name\" type=\"search\" placeholder=\"layer2.*conv\"></label> \
         <label>type <select id=\"filter-type\"><option value=\"\">any</option>",
    );
    let mut types: Vec<&str> = report
        .stages
        .iter()
        .map(|s| s.module_type.as_str())
        .collect();
    types.sort_unstable();
    types.dedup();
    for kind in types {
        let _ = write!(page, "<option>{}</option>", escape(kind));
    }
    page.push_str(
        "</select></label> <label>verdict <select id=\"filter-verdict\"><option value=\"\">any</option><option>succ</option><option>fail</option></select></label></p>\
         <table id=\"stages\"><thead><tr>",
    );
    let mut columns = vec![
        "#",
        "stage",
        "type",
        "shape",
        "verdict",
        "max|err|",
        "rel err",
        "vs tolerance",
        "cosine",
    ];
    if both {
        columns.push("isolated rel err");
    }
    for (position, column) in columns.iter().enumerate() {
        let _ = write!(
            page,
            "<th><button type=\"button\" data-column=\"{position}\">{}</button></th>",
            escape(column)
        );
    }
    page.push_str("</tr></thead><tbody>");
    for stage in &report.stages {
        let primary = stage.primary();
        let cells = |c: Option<&Comparison>| match c {
            Some(c) => (
                format!("{:.3e}", c.max_abs_error),
                format!("{:.3e}", c.relative_error),
                format!("{:.3}", tolerance_used(report, stage, c)),
                format!("{:.6}", c.cosine_similarity),
            ),
            None => Default::default(),
        };
        let (max_abs, relative, versus, cosine) = cells(primary);
        let verdict = if stage.verdict == Verdict::Succ {
            "succ"
        } else {
            "fail"
        };
        let _ = write!(
            page,
            "<tr class=\"{}\" data-name=\"{}\" data-type=\"{}\" data-verdict=\"{verdict}\"><td>{}</td><td><a href=\"#stage-{}\">{}</a></td><td>{}</td><td>{:?}</td><td>{}</td><td>{max_abs}</td><td>{relative}</td><td>{versus}</td><td>{cosine}</td>",
            primary.map_or("missing", |c| closeness(report, stage, c)),
            escape(&stage.name),
            escape(stage.module_type.as_str()),
            stage.index,
            anchor(&stage.name),
            escape(&stage.name),
            escape(stage.module_type.as_str()),
            stage.shape,
            verdict_badge(stage.verdict)
        );
        if both {
            let _ = write!(
                page,
                "<td>{}</td>",
                stage
                    .isolated
                    .as_ref()
                    .map(|c| format!("{:.3e}", c.relative_error))
                    .unwrap_or_default()
            );
        }
        page.push_str("</tr>");
    }
    page.push_str("</tbody></table></section>\n");
}

/// A verdict as a word and a sign, never colour alone.
fn verdict_badge(verdict: Verdict) -> String {
    match verdict {
        Verdict::Succ => "<span class=\"badge succ\">&#10003; succ</span>".into(),
        Verdict::Fail => "<span class=\"badge fail\">&#10007; fail</span>".into(),
    }
}

fn mode_words(mode: RunMode) -> &'static str {
    match mode {
        RunMode::Cumulative => "cumulative (the core end to end)",
        RunMode::Isolated => "isolated (each stage fed the reference's inputs)",
        RunMode::Both => "both (isolated and cumulative side by side)",
        RunMode::Dumps => "dumps (the candidate's stored outputs)",
    }
}

fn origin_words(origin: &Origin, mode: RunMode) -> String {
    match origin {
        Origin::Root => "root, the first stage to fail end to end".into(),
        Origin::Introduces => mode.introduces_words().into(),
        Origin::Carried { from } => format!("carried from {}", stage_link(Some(from))),
    }
}

fn stage_link(name: Option<&str>) -> String {
    match name {
        Some(name) => format!(
            "<a href=\"#stage-{}\"><code>{}</code></a>",
            anchor(name),
            escape(name)
        ),
        None => "none".into(),
    }
}

/// A stage name as an id, one to one: letters, digits, `.` and `-` kept,
/// every other character (`#`, `_`, spaces) written `_` and its hex code,
/// so that no two names share an id and none holds a space.
fn anchor(name: &str) -> String {
    let mut id = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            id.push(c);
        } else {
            let _ = write!(id, "_{:x}_", c as u32);
        }
    }
    id
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Colours that read for colour-blind eyes (Okabe-Ito blue and vermillion
/// with light and dark steps; every verdict also says its word), and a dark
/// scheme.
const STYLE: &str = r#"
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1a1a1a; --muted: #5a5a5a; --line: #d8d8d8;
  --far: #d6e9f8; --near: #9cc8ea; --over: #f5b88f; --way-over: #a94400; --way-over-fg: #ffffff;
  --succ: #0072b2; --fail: #b34700; --bar: #0072b2; --hint: #fff4d6; --link: #0b5cad; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #15171a; --fg: #e8e8e8; --muted: #a0a0a0; --line: #3a3d42;
    --far: #1d3447; --near: #2f5878; --over: #7a4a24; --way-over: #e07b39; --way-over-fg: #15171a;
    --succ: #56b4e9; --fail: #f0a060; --bar: #56b4e9; --hint: #3a3320; --link: #8cc8f5; }
  #plot svg { background: #ffffff; }
}
body { background: var(--bg); color: var(--fg); font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem; margin-top: 2rem; }
code { font-family: ui-monospace, monospace; } .meta { color: var(--muted); }
.badge { background: var(--bg); display: inline-block; padding: 0 .45em; border-radius: .3em; font-weight: 600; font-size: .85em; border: 1px solid; }
.badge.succ { color: var(--succ); } .badge.fail { color: var(--fail); }
.hint { background: var(--hint); padding: .15rem .4rem; border-radius: .2rem; }
.warning { font-weight: 600; color: var(--fail); }
.legend .swatch { padding: .1rem .5rem; border-radius: .2rem; margin-right: .4rem; }
.far { background: var(--far); } .near { background: var(--near); } .over { background: var(--over); }
a { color: var(--link); }
.way-over { background: var(--way-over); color: var(--way-over-fg); }
.way-over a { color: var(--way-over-fg); }
details { margin: .1rem 0 .1rem 1rem; } summary { cursor: pointer; }
.stage { display: grid; grid-template-columns: 18rem 9rem 6rem 1fr 12rem; gap: .5rem; padding: .05rem .4rem; margin-left: 1rem; border-radius: .2rem; }
.stage:target, tr:target { outline: 2px solid var(--fg); }
.failure { border: 1px solid var(--line); border-radius: .4rem; padding: .5rem 1rem; margin: 1rem 0; }
figure { margin: .5rem 0; } figcaption { color: var(--muted); font-size: .9em; }
path.channels, rect.bucket { fill: var(--bar); }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: .15rem .5rem; text-align: left; }
th button { font: inherit; font-weight: 600; background: none; border: none; color: var(--fg); cursor: pointer; padding: 0; }
.filters label { margin-right: 1rem; }
"#;

/// Sorting and filtering of the stage table; nothing else, and nothing
/// fetched.
const SCRIPT: &str = r#"
(function () {
  var table = document.getElementById('stages');
  if (!table) return;
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var name = document.getElementById('filter-name');
  var type = document.getElementById('filter-type');
  var verdict = document.getElementById('filter-verdict');
  // A glob: * any run, ? one character, everything else literal.
  function pattern(text) {
    var escaped = text.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.');
    return new RegExp(escaped, 'i');
  }
  function filter() {
    var match = pattern(name.value);
    rows.forEach(function (row) {
      var show = (!match || match.test(row.dataset.name)) &&
        (!type.value || row.dataset.type === type.value) &&
        (!verdict.value || row.dataset.verdict === verdict.value);
      row.style.display = show ? '' : 'none';
    });
  }
  [name, type, verdict].forEach(function (input) { input.addEventListener('input', filter); });
  var ascending = {};
  table.tHead.addEventListener('click', function (event) {
    var button = event.target.closest('button');
    if (!button) return;
    var column = Number(button.dataset.column);
    ascending[column] = !ascending[column];
    var sign = ascending[column] ? 1 : -1;
    rows.sort(function (a, b) {
      var x = a.cells[column].textContent, y = b.cells[column].textContent;
      var p = parseFloat(x), q = parseFloat(y);
      if (!isNaN(p) && !isNaN(q)) return sign * (p - q);
      return sign * x.localeCompare(y);
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
})();
"#;

#[cfg(test)]
mod tests {
    use super::anchor;

    #[test]
    fn ids_are_one_to_one_and_hold_no_space() {
        let names = [
            "layer1.0.relu#1",
            "layer1.0.relu-1",
            "layer1.0.relu_23_1",
            "a b",
            "a_20_b",
        ];
        let ids: Vec<String> = names.iter().map(|name| anchor(name)).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(
                !id.contains(char::is_whitespace) && !id.contains('#'),
                "{id}"
            );
            assert!(ids[i + 1..].iter().all(|other| other != id), "{id}");
        }
        assert_eq!(anchor("layer2.0.downsample.0"), "layer2.0.downsample.0");
    }
}
