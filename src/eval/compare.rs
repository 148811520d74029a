//! `magictailor compare`: evaluated runs side by side, as the paper's Table 1 puts the
//! methods: CLIP-T, CLIP-I and DINO per method, mean ± std over pairs (each pair's
//! overall mean from its `eval` report), overall and per aspect group; and an HTML page
//! with each prompt's images per method beside the reference images.
//!
//! Runs compare only under one protocol (prompts, seeds, sampling, scoring models and
//! segmentation): a difference is refused, naming the runs and the setting.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::metrics::Stats;
use super::report::ReportFiles;
use crate::error::{Error, Result};
use crate::infer::many::image_file;
use crate::io::{run, write_atomic};

/// The metrics of Table 1, as `metrics.json` names them, and as the table heads them.
const METRICS: [(&str, &str); 3] = [("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO")];

/// The order Table 1 lists methods in: the baselines, then MagicTailor (ViCo, not in the
/// table, before it).
const ORDER: [&str; 7] = [
    "ti",
    "dreambooth",
    "custom-diffusion",
    "break-a-scene",
    "clic",
    "vico",
    "magictailor",
];

/// Why DreamSim has no column.
pub const DREAMSIM_ABSENT: &str = "DreamSim is not reported: its released weights (the \
    `dreamsim` package's ensemble checkpoint) are pickled PyTorch files, and magictailor \
    loads safetensors only.";

/// What to compare and where the report goes.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Trained folders (their `eval/<eval>/` report is read), eval folders, or
    /// `metrics.json` files.
    pub runs: Vec<PathBuf>,
    /// The eval folder inside a trained folder: `k0` unless `eval --layout-steps` or
    /// `--retouch` was set (`kN`, `kN-retouch`).
    pub eval: String,
    /// Which report of an eval folder: "attention" (`metrics.json`) or "none".
    pub segmentation: String,
    pub out: PathBuf,
}

/// One evaluated run.
struct Entry {
    metrics_file: PathBuf,
    eval_dir: PathBuf,
    method: String,
    pair: String,
    instance_dir: PathBuf,
    metrics: Value,
}

/// Writes `compare.md`, `compare.html` and `compare.json` into `opts.out`; returns the JSON.
pub fn compare(opts: &CompareOptions) -> Result<Value> {
    if opts.runs.is_empty() {
        return Err(Error::usage("compare needs at least one evaluated run."));
    }
    let entries = (opts.runs.iter())
        .map(|r| entry(r, opts))
        .collect::<Result<Vec<_>>>()?;
    check_protocol(&entries)?;
    check_unique(&entries)?;
    let methods = methods(&entries);
    let report = json_report(&entries, &methods);
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| Error::io(crate::error::IoOp::CreateDir, &opts.out, e))?;
    let text = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::internal(format!("serializing compare.json: {e}")))?;
    write_atomic(&opts.out.join("compare.json"), text.as_bytes())?;
    write_atomic(&opts.out.join("compare.md"), markdown(&report).as_bytes())?;
    let html = html(&report, &entries, &methods, &opts.out)?;
    write_atomic(&opts.out.join("compare.html"), html.as_bytes())?;
    Ok(report)
}

/// Finds a run's report and reads it, with its method from the run's record.
fn entry(arg: &Path, opts: &CompareOptions) -> Result<Entry> {
    let name = |dir: &Path| ReportFiles::new(dir, &opts.segmentation).metrics;
    let metrics_file = if arg.is_file() {
        arg.to_path_buf()
    } else if arg.join(run::RECORD).is_file() {
        name(&arg.join("eval").join(&opts.eval))
    } else {
        name(arg)
    };
    if !metrics_file.is_file() {
        return Err(Error::usage(format!(
            "{}: no evaluation report at {}. Run `magictailor eval --model-dir {}` first (or pass \
             the eval folder, or --eval for another one).",
            arg.display(),
            metrics_file.display(),
            arg.display()
        )));
    }
    let text = std::fs::read_to_string(&metrics_file).map_err(|e| Error::read(&metrics_file, e))?;
    let metrics: Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: metrics_file.clone(),
        msg: e.to_string(),
    })?;
    let field = |k: &str| {
        metrics[k].as_str().map(PathBuf::from).ok_or_else(|| {
            Error::bad_file(
                &metrics_file,
                format!(
                    "{} lacks {k:?}: not an `eval` report.",
                    metrics_file.display()
                ),
            )
        })
    };
    let (model_dir, instance_dir) = (field("model_dir")?, field("instance_dir")?);
    // The method a run trained with; folders from before `--method` are MagicTailor's.
    let method = run::open(&model_dir)
        .ok()
        .and_then(|f| f.record.method)
        .and_then(|m| m["name"].as_str().map(String::from))
        .unwrap_or_else(|| "magictailor".into());
    let pair = (instance_dir.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| instance_dir.display().to_string());
    let eval_dir = metrics_file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    Ok(Entry {
        metrics_file,
        eval_dir,
        method,
        pair,
        instance_dir,
        metrics,
    })
}

/// The settings that must agree for scores to be compared.
const PROTOCOL: [&str; 5] = [
    "protocol",
    "models",
    "reference_segmentation",
    "generated_segmentation",
    "masked_fill",
];

fn check_protocol(entries: &[Entry]) -> Result<()> {
    let first = &entries[0];
    for e in &entries[1..] {
        for key in PROTOCOL {
            if e.metrics[key] != first.metrics[key] {
                return Err(Error::usage(format!(
                    "{} and {} were evaluated differently ({key}: {} vs {}); scores compare only \
                     under one protocol. Evaluate them with the same `eval` settings.",
                    first.metrics_file.display(),
                    e.metrics_file.display(),
                    first.metrics[key],
                    e.metrics[key]
                )));
            }
        }
    }
    Ok(())
}

/// One report per method and pair: a second would count the pair twice.
fn check_unique(entries: &[Entry]) -> Result<()> {
    let mut seen: BTreeMap<(&str, &str), &Path> = BTreeMap::new();
    for e in entries {
        if let Some(other) = seen.insert((&e.method, &e.pair), &e.metrics_file) {
            return Err(Error::usage(format!(
                "{} and {} are both --method {} on the pair {}: pass one of them.",
                other.display(),
                e.metrics_file.display(),
                e.method,
                e.pair
            )));
        }
    }
    Ok(())
}

/// The methods present, in Table 1's order (unknown names after, as given).
fn methods(entries: &[Entry]) -> Vec<String> {
    let mut out: Vec<String> = (ORDER.iter())
        .filter(|m| entries.iter().any(|e| e.method == **m))
        .map(|m| m.to_string())
        .collect();
    for e in entries {
        if !out.contains(&e.method) {
            out.push(e.method.clone());
        }
    }
    out
}

/// Mean ± std (population) over pairs of each metric's mean in `summary_of(report)`.
fn over_pairs<'a>(
    runs: impl Iterator<Item = &'a Entry>,
    summary_of: impl Fn(&Value) -> Value,
) -> Value {
    let runs: Vec<&Entry> = runs.collect();
    let mut out = serde_json::Map::new();
    for (key, _) in METRICS {
        let means: Vec<f64> = (runs.iter())
            .filter_map(|e| summary_of(&e.metrics)[key]["mean"].as_f64())
            .collect();
        out.insert(
            key.into(),
            stats_of(&means).map_or(Value::Null, |s| json!(s)),
        );
    }
    Value::Object(out)
}

fn stats_of(v: &[f64]) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Some(Stats {
        mean,
        std: var.sqrt(),
        n: v.len(),
    })
}

/// The aspect groups in the order the first report lists them.
fn group_names(entries: &[Entry]) -> Vec<String> {
    let mut names = Vec::new();
    for e in entries {
        for g in e.metrics["groups"].as_array().into_iter().flatten() {
            if let Some(n) = g["name"].as_str().filter(|n| !names.iter().any(|m| m == n)) {
                names.push(n.to_string());
            }
        }
    }
    names
}

fn group_summary(metrics: &Value, name: &str) -> Value {
    (metrics["groups"].as_array().into_iter().flatten())
        .find(|g| g["name"] == name)
        .map(|g| g["summary"].clone())
        .unwrap_or(Value::Null)
}

fn json_report(entries: &[Entry], methods: &[String]) -> Value {
    let groups = group_names(entries);
    let rows: Vec<Value> = (methods.iter())
        .map(|m| {
            let of = || entries.iter().filter(move |e| &e.method == m);
            let per_group: serde_json::Map<String, Value> = (groups.iter())
                .map(|g| (g.clone(), over_pairs(of(), |r| group_summary(r, g))))
                .collect();
            json!({
                "method": m,
                "pairs": of().map(|e| e.pair.clone()).collect::<Vec<_>>(),
                "overall": over_pairs(of(), |r| r["overall"].clone()),
                "groups": per_group,
            })
        })
        .collect();
    let runs: Vec<Value> = (entries.iter())
        .map(|e| {
            json!({
                "method": e.method, "pair": e.pair, "report": e.metrics_file,
                "overall": e.metrics["overall"],
            })
        })
        .collect();
    json!({
        "magictailor_version": env!("CARGO_PKG_VERSION"),
        "std": "population (ddof 0) over pairs, of each pair's mean over its images",
        "protocol": entries[0].metrics["protocol"],
        "models": entries[0].metrics["models"],
        "groups": groups,
        "methods": rows,
        "runs": runs,
        "dreamsim": DREAMSIM_ABSENT,
    })
}

fn cell(s: &Value) -> String {
    match (s["mean"].as_f64(), s["std"].as_f64()) {
        (Some(m), Some(sd)) => format!("{m:.4} ± {sd:.4}"),
        _ => "–".into(),
    }
}

/// The method whose mean is highest for `key` in `pick(row)` (all three scores: higher is
/// better).
fn best(report: &Value, key: &str, pick: &dyn Fn(&Value) -> Value) -> Option<String> {
    (report["methods"].as_array()?.iter())
        .filter_map(|r| {
            Some((
                r["method"].as_str()?.to_string(),
                pick(r)[key]["mean"].as_f64()?,
            ))
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(m, _)| m)
}

/// A table of every method for the summaries `pick` selects; the best mean in bold.
fn table(report: &Value, pick: &dyn Fn(&Value) -> Value) -> String {
    let mut md =
        String::from("| Method | pairs | CLIP-T | CLIP-I | DINO |\n|---|---|---|---|---|\n");
    for r in report["methods"].as_array().into_iter().flatten() {
        let name = r["method"].as_str().unwrap_or("?");
        let n = r["pairs"].as_array().map_or(0, Vec::len);
        let cells: Vec<String> = (METRICS.iter())
            .map(|(k, _)| {
                let c = cell(&pick(r)[*k]);
                if best(report, k, pick).as_deref() == Some(name) {
                    format!("**{c}**")
                } else {
                    c
                }
            })
            .collect();
        md.push_str(&format!("| {name} | {n} | {} |\n", cells.join(" | ")));
    }
    md
}

fn markdown(report: &Value) -> String {
    let p = &report["protocol"];
    let mut md = format!(
        "# magictailor compare\n\n{} seeds x the prompts of {}, {} DDIM steps, guidance {}, {}x{}. CLIP: \
         `{}`; DINO: `{}`.\nMean ± std over pairs of each pair's mean over its images (overall: \
         the prompts naming every sample, as `eval`). Best mean in bold.\n\n## Table 1\n\n",
        p["seeds"].as_array().map_or(0, Vec::len),
        p["prompts_file"].as_str().unwrap_or("?"),
        p["steps"],
        p["guidance"],
        p["width"],
        p["height"],
        report["models"]["clip"].as_str().unwrap_or("?"),
        report["models"]["dino"].as_str().unwrap_or("?"),
    );
    md.push_str(&table(report, &|r| r["overall"].clone()));
    md.push_str(&format!("\n{DREAMSIM_ABSENT}\n"));
    for g in report["groups"].as_array().into_iter().flatten() {
        let g = g.as_str().unwrap_or("?").to_string();
        md.push_str(&format!("\n## {g}\n\n"));
        md.push_str(&table(report, &|r| r["groups"][&g].clone()));
    }
    md.push_str("\n## Runs\n\n| Method | pair | CLIP-T | CLIP-I | DINO | report |\n|---|---|---|---|---|---|\n");
    for r in report["runs"].as_array().into_iter().flatten() {
        let o = &r["overall"];
        let mean = |k: &str| {
            o[k]["mean"]
                .as_f64()
                .map_or("–".into(), |m| format!("{m:.4}"))
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r["method"].as_str().unwrap_or("?"),
            r["pair"].as_str().unwrap_or("?"),
            mean("clip_t"),
            mean("clip_i"),
            mean("dino"),
            r["report"].as_str().unwrap_or("?"),
        ));
    }
    md
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `to` as the page in `from` links it: relative where both are absolute, so the folder
/// can move with the runs beside it.
fn link(from: &Path, to: &Path) -> String {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (from, to) = (abs(from), abs(to));
    let (a, b): (Vec<_>, Vec<_>) = (from.components().collect(), to.components().collect());
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..a.len() {
        rel.push("..");
    }
    for c in &b[common..] {
        rel.push(c.as_os_str());
    }
    escape(&rel.to_string_lossy())
}

/// The page: Table 1, then per pair its reference images and, per prompt, a row per
/// method with its scores and images.
fn html(report: &Value, entries: &[Entry], methods: &[String], out: &Path) -> Result<String> {
    let md_table = |pick: &dyn Fn(&Value) -> Value| -> String {
        let mut h = String::from("<table><tr><th>Method</th><th>pairs</th><th>CLIP-T</th><th>CLIP-I</th><th>DINO</th></tr>");
        for r in report["methods"].as_array().into_iter().flatten() {
            let name = r["method"].as_str().unwrap_or("?");
            h.push_str(&format!(
                "<tr><td>{}</td><td>{}</td>",
                escape(name),
                r["pairs"].as_array().map_or(0, Vec::len)
            ));
            for (k, _) in METRICS {
                let c = escape(&cell(&pick(r)[k]));
                let b = best(report, k, pick).as_deref() == Some(name);
                h.push_str(&if b {
                    format!("<td><b>{c}</b></td>")
                } else {
                    format!("<td>{c}</td>")
                });
            }
            h.push_str("</tr>");
        }
        h + "</table>"
    };
    let mut h = String::from(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>magictailor compare</title><style>\
         body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}\
         td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{height:128px;margin:1px}\
         .scores{font-size:90%;color:#333;white-space:nowrap}</style></head><body>\
         <h1>magictailor compare</h1><h2>Table 1</h2>",
    );
    h.push_str(&md_table(&|r| r["overall"].clone()));
    h.push_str(&format!("<p>{}</p>", escape(DREAMSIM_ABSENT)));
    for g in report["groups"].as_array().into_iter().flatten() {
        let g = g.as_str().unwrap_or("?").to_string();
        h.push_str(&format!("<h3>{}</h3>", escape(&g)));
        h.push_str(&md_table(&|r| r["groups"][&g].clone()));
    }
    let seeds: Vec<u64> = (report["protocol"]["seeds"].as_array().into_iter().flatten())
        .filter_map(Value::as_u64)
        .collect();
    let mut pairs: Vec<&str> = entries.iter().map(|e| e.pair.as_str()).collect();
    pairs.dedup();
    pairs.sort();
    pairs.dedup();
    for pair in pairs {
        let of_pair: Vec<&Entry> = (methods.iter())
            .filter_map(|m| entries.iter().find(|e| e.pair == pair && &e.method == m))
            .collect();
        h.push_str(&format!(
            "<h2>{}</h2><p>Reference images:<br>",
            escape(pair)
        ));
        for f in crate::data::image_files(&of_pair[0].instance_dir).unwrap_or_default() {
            h.push_str(&format!("<img src=\"{}\">", link(out, &f)));
        }
        h.push_str("</p>");
        let prompts = of_pair[0].metrics["prompts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for (i, p) in prompts.iter().enumerate() {
            h.push_str(&format!(
                "<h3>{i:02} {}</h3><table>",
                escape(p["prompt"].as_str().unwrap_or("?"))
            ));
            for e in &of_pair {
                let s = &e.metrics["prompts"][i]["summary"];
                let mean = |k: &str| {
                    s[k]["mean"]
                        .as_f64()
                        .map_or("–".into(), |m| format!("{m:.3}"))
                };
                h.push_str(&format!(
                    "<tr><td>{}<div class=\"scores\">CLIP-T {} · CLIP-I {} · DINO {}</div></td><td>",
                    escape(&e.method),
                    mean("clip_t"),
                    mean("clip_i"),
                    mean("dino")
                ));
                for &seed in &seeds {
                    let img = image_file(&e.eval_dir, i, seed);
                    h.push_str(&format!(
                        "<img src=\"{}\" title=\"seed {seed}\">",
                        link(out, &img)
                    ));
                }
                h.push_str("</td></tr>");
            }
            h.push_str("</table>");
        }
    }
    h.push_str("</body></html>\n");
    Ok(h)
}
