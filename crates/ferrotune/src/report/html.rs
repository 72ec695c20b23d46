//! The report page: one HTML file with its styles and charts (inline SVG) inside it, no
//! scripts and no address outside it, so it opens offline, mails as one file, and a
//! browser makes no request to show it.

use std::fmt::Write as _;

use serde_json::Value;

use crate::error::Result;
use crate::report::plots::{self, Chart};
use crate::report::RunFiles;

/// How many of the worst held-out examples the page lists.
pub const WORST_SHOWN: usize = 15;

/// Characters of an example's text shown in the table (all that was kept is in its tooltip).
pub const TEXT_SHOWN: usize = 220;

fn shorten(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", s[..i].trim_end()),
        None => s.to_string(),
    }
}

const STYLE: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Ubuntu,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1220px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#59636e;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px 14px;min-width:140px}
.card b{display:block;font-size:1.3em}.card span{color:#59636e;font-size:.85em}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:12px}
figure{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:0;padding:6px}
figure svg{width:100%;height:auto;display:block}
figure.one{max-width:760px}
table{border-collapse:collapse;background:#fff;font-size:.9em}
.wide{overflow-x:auto;max-width:100%}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:right;vertical-align:top}
th{background:#f0f3f6}td.t{text-align:left;max-width:520px}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px 12px}
pre{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:10px;overflow:auto;font-size:.85em}
.ok{color:#1a7f37}.bad{color:#cf222e}
footer{color:#59636e;font-size:.8em;margin-top:32px}
";

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v == v.trunc() && v.abs() < 1e9 {
        return format!("{v:.0}");
    }
    if v.abs() >= 1e-3 {
        format!("{v:.4}")
    } else {
        format!("{v:.3e}")
    }
}

fn json_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(json_text).collect::<Vec<_>>().join(", "),
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), num),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The whole page.
pub fn page(run: &RunFiles, charts: &[Chart]) -> Result<String> {
    let mut h = String::new();
    let name = run.dir.file_name().map_or_else(
        || run.dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let start = run.start.as_ref();
    let get = |k: &str| start.and_then(|m| m.get(k));
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\">\
         <title>ferrotune report: {}</title><style>{STYLE}</style></head><body><main>\n",
        escape(&name)
    );
    let _ = writeln!(h, "<h1>ferrotune run: {}</h1>", escape(&name));
    let mut sub = Vec::new();
    if let Some(v) = get("model_type").and_then(Value::as_str) {
        sub.push(format!("model type {}", escape(v)));
    }
    if let Some(v) = run.problem_type() {
        sub.push(escape(v));
    }
    if let Some(v) = get("labels").and_then(Value::as_array) {
        sub.push(format!("{} labels", v.len()));
    }
    if let (Some(t), Some(e)) = (get("train_examples"), get("eval_examples")) {
        sub.push(format!("{t} training / {e} evaluation examples"));
    }
    if let Some(p) = get("parameters").and_then(Value::as_u64) {
        sub.push(format!("{:.1} M parameters", p as f64 / 1e6));
    }
    let _ = writeln!(h, "<p class=\"sub\">{}</p>", sub.join(" · "));
    if !run.notes.is_empty() {
        let _ = writeln!(
            h,
            "<div class=\"warn\"><b>This report is partial.</b><ul>{}</ul></div>",
            run.notes
                .iter()
                .map(|n| format!("<li>{}</li>", escape(n)))
                .collect::<String>()
        );
    }
    cards(&mut h, run);
    if let Some(Value::Array(notes)) = get("notes") {
        if !notes.is_empty() {
            let _ = writeln!(
                h,
                "<h2>Notes from the run</h2><ul>{}</ul>",
                notes
                    .iter()
                    .map(|n| format!("<li>{}</li>", escape(&json_text(n))))
                    .collect::<String>()
            );
        }
    }
    // In a grid of charts a figure takes its cell; alone, at most its own size.
    let figure = |h: &mut String, c: &Chart, alone: bool| -> Result<()> {
        let svg = plots::svg(c)?;
        let _ = writeln!(
            h,
            "<figure id=\"{}\"{} aria-label=\"{}\">{}</figure>",
            escape(&c.name),
            if alone { " class=\"one\"" } else { "" },
            escape(&c.title),
            svg_body(&svg)
        );
        Ok(())
    };
    // A titled grid of the charts of one kind.
    let grid = |h: &mut String, title: &str, keep: fn(&plots::Plot) -> bool| -> Result<()> {
        let shown: Vec<&Chart> = charts.iter().filter(|c| keep(&c.plot)).collect();
        if !shown.is_empty() {
            let _ = writeln!(h, "<h2>{title}</h2><div class=\"charts\">");
            for c in shown {
                figure(h, c, false)?;
            }
            h.push_str("</div>\n");
        }
        Ok(())
    };
    grid(&mut h, "Curves", |p| matches!(p, plots::Plot::Lines { .. }))?;
    eval_table(&mut h, run);
    if let Some(c) = charts.iter().find(|c| c.name == "confusion_matrix") {
        let best = run
            .best
            .as_ref()
            .map_or(String::new(), |b| format!(" (epoch {})", num(b.0)));
        let _ = writeln!(h, "<h2>Confusion matrix of the exported model{best}</h2>");
        figure(&mut h, c, true)?;
    }
    class_table(&mut h, run);
    grid(&mut h, "Predicted against true values (held-out)", |p| {
        matches!(p, plots::Plot::Scatter { .. })
    })?;
    worst_table(&mut h, run);
    settings(&mut h, run);
    let _ = writeln!(
        h,
        "<footer>Written by ferrotune {} from {}. Plots also as PNG files in plots/.</footer>\
         </main></body></html>",
        env!("CARGO_PKG_VERSION"),
        escape(&run.dir.display().to_string())
    );
    Ok(h)
}

/// Plotters' SVG document without its XML prolog, ready to sit inside HTML.
fn svg_body(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

fn cards(h: &mut String, run: &RunFiles) {
    let mut cards: Vec<(String, String)> = Vec::new();
    if let Some((epoch, metric, value)) = &run.best {
        cards.push((
            num(*value),
            format!("best eval_{metric} (epoch {})", num(*epoch)),
        ));
    } else if let Some(last) = run.evals.last() {
        if let Some(a) = last.metrics.get("accuracy").or(last.metrics.get("loss")) {
            cards.push((
                num(*a),
                format!("last evaluation (epoch {})", num(last.epoch)),
            ));
        }
    }
    if let Some(s) = &run.summary {
        if let Some(t) = s.get("train_seconds").and_then(Value::as_f64) {
            cards.push((format!("{t:.0} s"), "training time".into()));
        }
        if let Some(n) = s.get("steps").and_then(Value::as_u64) {
            cards.push((n.to_string(), "optimisation steps".into()));
        }
    } else {
        cards.push((
            "running or stopped".into(),
            "no train_summary.json yet".into(),
        ));
    }
    cards.push((run.evals.len().to_string(), "epochs evaluated".into()));
    if let Some(e) = run.early_stop {
        cards.push((num(e), "stopped early after epoch".into()));
    }
    if run.skipped_steps > 0 {
        cards.push((
            run.skipped_steps.to_string(),
            "non-finite steps skipped".into(),
        ));
    }
    h.push_str("<div class=\"cards\">");
    for (v, l) in cards {
        let _ = write!(
            h,
            "<div class=\"card\"><b>{}</b><span>{}</span></div>",
            escape(&v),
            escape(&l)
        );
    }
    h.push_str("</div>\n");
}

fn eval_table(h: &mut String, run: &RunFiles) {
    if run.evals.is_empty() {
        return;
    }
    let mut keys: Vec<&String> = run.evals.iter().flat_map(|e| e.metrics.keys()).collect();
    keys.sort();
    keys.dedup();
    h.push_str(
        "<h2>Evaluation after each epoch</h2><div class=\"wide\"><table><tr><th>epoch</th>\
         <th>step</th>",
    );
    for k in &keys {
        let _ = write!(h, "<th>eval_{}</th>", escape(k));
    }
    h.push_str("</tr>\n");
    let best_epoch = run.best.as_ref().map(|b| b.0);
    for e in &run.evals {
        let mark = if Some(e.epoch) == best_epoch {
            " ★"
        } else {
            ""
        };
        let _ = write!(
            h,
            "<tr><td>{}{mark}</td><td>{}</td>",
            num(e.epoch),
            num(e.step)
        );
        for k in &keys {
            let _ = write!(
                h,
                "<td>{}</td>",
                e.metrics.get(*k).map_or(String::new(), |v| num(*v))
            );
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table></div>\n");
}

fn class_table(h: &mut String, run: &RunFiles) {
    let Some((names, r)) = run.class_report() else {
        return;
    };
    h.push_str(
        "<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th>\
         <th>f1-score</th><th>support</th></tr>\n",
    );
    for (n, s) in names.iter().zip(&r.per_class) {
        let _ = writeln!(
            h,
            "<tr><td class=\"t\">{}</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{}</td></tr>",
            escape(n),
            s.precision,
            s.recall,
            s.f1,
            s.support
        );
    }
    let total: usize = r.per_class.iter().map(|s| s.support).sum();
    let _ = writeln!(
        h,
        "<tr><td class=\"t\">accuracy</td><td></td><td></td><td>{:.4}</td><td>{total}</td></tr>\
         <tr><td class=\"t\">macro avg</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{total}</td></tr>\
         <tr><td class=\"t\">weighted avg</td><td>{:.4}</td><td>{:.4}</td><td>{:.4}</td><td>{total}</td></tr>\
         </table><p class=\"sub\">MCC {:.4}</p>",
        r.accuracy,
        r.macro_precision,
        r.macro_recall,
        r.macro_f1,
        r.weighted_precision,
        r.weighted_recall,
        r.weighted_f1,
        r.mcc
    );
}

fn worst_table(h: &mut String, run: &RunFiles) {
    let worst = run.worst(WORST_SHOWN);
    if worst.is_empty() {
        return;
    }
    let single = run.problem_type() == Some("single_label_classification");
    let labels: Vec<String> = run
        .start
        .as_ref()
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_array)
        .map(|a| a.iter().map(json_text).collect())
        .unwrap_or_default();
    let _ = writeln!(
        h,
        "<h2>Held-out examples with the highest loss</h2><p class=\"sub\">{} of {} evaluation \
         examples, from eval_predictions.jsonl (the exported model's predictions).</p>",
        worst.len(),
        run.predictions.len()
    );
    h.push_str(
        "<div class=\"wide\"><table><tr><th>example</th><th>text</th><th>true</th>\
         <th>predicted</th>",
    );
    if single {
        h.push_str("<th>p(predicted)</th><th>p(true)</th>");
    }
    h.push_str("<th>loss</th></tr>\n");
    for p in worst {
        // A language model's line (perplexity, no class) is neither right nor wrong.
        let class = match (p.output.is_empty(), p.target == p.predicted) {
            (true, _) => "",
            (false, true) => "ok",
            (false, false) => "bad",
        };
        let _ = write!(
            h,
            "<tr><td class=\"t\">{}</td><td class=\"t\" title=\"{}\">{}</td>\
             <td class=\"t\">{}</td><td class=\"t {}\">{}</td>",
            escape(&p.id),
            escape(&p.text),
            escape(&shorten(&p.text, TEXT_SHOWN)),
            escape(&json_text(&p.target)),
            class,
            escape(&json_text(&p.predicted)),
        );
        if single {
            let prob = |v: &Value| {
                let name = v.as_str()?;
                let i = labels.iter().position(|l| l == name)?;
                p.output.get(i).copied()
            };
            let show = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.3}"));
            let _ = write!(
                h,
                "<td>{}</td><td>{}</td>",
                show(prob(&p.predicted)),
                show(prob(&p.target))
            );
        }
        let _ = writeln!(h, "<td>{}</td></tr>", num(p.loss));
    }
    h.push_str("</table></div>\n");
}

fn settings(h: &mut String, run: &RunFiles) {
    h.push_str("<h2>Settings and timings</h2>\n");
    let mut rows: Vec<(String, String)> = Vec::new();
    if let Some(s) = &run.summary {
        for (k, v) in s {
            rows.push((k.clone(), json_text(v)));
        }
        if let (Some(t), Some(n)) = (
            s.get("train_seconds").and_then(Value::as_f64),
            s.get("steps").and_then(Value::as_f64),
        ) {
            if n > 0.0 {
                rows.push(("seconds per step".into(), format!("{:.3}", t / n)));
            }
        }
    }
    if !run.throughput.is_empty() {
        let n = run.throughput.len() as f64;
        let ex: f64 = run.throughput.iter().map(|t| t.1).sum::<f64>() / n;
        rows.push(("mean examples / s".into(), format!("{ex:.1}")));
        let tok: Vec<f64> = run
            .throughput
            .iter()
            .map(|t| t.2)
            .filter(|t| t.is_finite())
            .collect();
        if !tok.is_empty() {
            rows.push((
                "mean tokens / s".into(),
                format!("{:.0}", tok.iter().sum::<f64>() / tok.len() as f64),
            ));
        }
    }
    if let Some(t) = run.start.as_ref().and_then(|m| m.get("threads")) {
        rows.push(("threads".into(), json_text(t)));
    }
    if !rows.is_empty() {
        h.push_str("<table>");
        for (k, v) in rows {
            let _ = writeln!(
                h,
                "<tr><th>{}</th><td class=\"t\">{}</td></tr>",
                escape(&k),
                escape(&v)
            );
        }
        h.push_str("</table>\n");
    }
    if !run.groups.is_empty() {
        h.push_str(
            "<h3>Parameter groups at the start</h3><table><tr><th>group</th><th>learning \
             rate</th><th>frozen</th><th>parameters</th></tr>\n",
        );
        for g in &run.groups {
            let f = |k: &str| g.get(k).map_or(String::new(), json_text);
            let _ = writeln!(
                h,
                "<tr><td class=\"t\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&f("group")),
                escape(&f("learning_rate")),
                escape(&f("frozen")),
                escape(&f("parameters"))
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(r) = &run.recipe {
        let _ = writeln!(
            h,
            "<h3>Recipe (recipe.resolved.toml)</h3><pre>{}</pre>",
            escape(r)
        );
    }
}
