//! `magictailor compare`: evaluated runs side by side (the paper's Table 1).

use std::path::PathBuf;

use clap::Args;
use magictailor::eval::compare::{compare, CompareOptions};
use magictailor::io::console;

#[derive(Args)]
pub(super) struct CompareArgs {
    /// Evaluated runs: trained folders (their eval/K0 report is read; see --eval), eval
    /// folders, or metrics.json files. The method comes from each run's magictailor.json,
    /// the pair from the report.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where compare.md, compare.html and compare.json go.
    #[arg(long = "out-dir", alias = "out", default_value = "outputs/compare")]
    out_dir: PathBuf,
    /// The eval folder of a trained folder: k0, kN for `eval --layout-steps N`, kN-retouch
    /// for `eval --retouch`.
    #[arg(long, default_value = "k0")]
    eval: String,
    /// Which report of an eval folder: attention (metrics.json) or none
    /// (metrics-none.json, from `eval --segment none`).
    #[arg(long, default_value = "attention", value_parser = ["attention", "none"])]
    segment: String,
    /// Print compare.json on stdout instead of the table.
    #[arg(long)]
    json: bool,
}

pub(super) fn compare_cmd(a: CompareArgs) -> magictailor::Result<()> {
    let opts = CompareOptions {
        runs: a.runs,
        eval: a.eval,
        segmentation: a.segment,
        out: a.out_dir.clone(),
    };
    let report = compare(&opts)?;
    if a.json {
        console::line(report);
    } else {
        let md = std::fs::read_to_string(a.out_dir.join("compare.md"))
            .map_err(|e| magictailor::Error::read(&a.out_dir.join("compare.md"), e))?;
        console::line(md.trim_end());
        console::note(format_args!(
            "wrote {} (open it in a browser)",
            a.out_dir.join("compare.html").display()
        ));
    }
    Ok(())
}
