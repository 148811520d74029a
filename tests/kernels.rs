//! The kernels' first-use check and its fallback, end to end on the CPU: a test hook
//! (`MAGICTAILOR_KERNEL_FAULT`, debug builds) makes one family disagree with the composed
//! op, or fail to launch at once or mid-run; training must finish on the composed op,
//! say so once, and record it in magictailor.json.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// 2 warm-up + 2 DS-Bal steps at 64 px on the tiny model, with `fault` injected.
fn train_with_fault(root: &Path, name: &str, fault: Option<&str>) -> (Output, std::path::PathBuf) {
    let pair = pair_folder(root, &PairSpec::training());
    let out = root.join(name);
    let (pair, out_s, model) = (pair.to_str().unwrap(), out.to_str().unwrap(), tiny_sd());
    let args = with_args(
        quiet_train_args(pair, out_s, &model),
        &["--warmup-steps", "2", "--dsbal-steps", "2"],
    );
    let mut c = bin_command("train", &args);
    if let Some(f) = fault {
        c.env("MAGICTAILOR_KERNEL_FAULT", f);
    }
    (c.output().unwrap(), out)
}

/// The `kernels` entries of a finished run's record, by family.
fn recorded(out: &Path, family: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("magictailor.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    let kernels = record["kernels"]
        .as_array()
        .expect("kernels recorded")
        .clone();
    (kernels.into_iter())
        .find(|k| k["family"] == family && k["device"] == "cpu")
        .unwrap_or_else(|| panic!("no {family} entry in {}", record["kernels"]))
}

/// The losses of a run's log, step by step.
fn losses(out: &Path) -> Vec<f64> {
    read_log(out)
        .iter()
        .map(|l| l["loss"].as_f64().expect("a loss per step"))
        .collect()
}

#[test]
fn every_family_is_checked_and_recorded_in_a_clean_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = train_with_fault(tmp.path(), "clean", None);
    ok(&o);
    assert!(!stderr(&o).contains("kernels are off"), "{}", stderr(&o));
    for family in ["attention", "group-norm", "layer-norm", "geglu"] {
        let k = recorded(&out, family);
        assert_eq!(k["state"], "checked", "{k}");
        assert!(k["max_rel_err"].as_f64().unwrap() < 1e-5, "{k}");
    }
}

#[test]
fn a_disagreeing_family_is_switched_off_and_training_finishes_on_the_composed_op() {
    let tmp = tempfile::tempdir().unwrap();
    let (clean, clean_out) = train_with_fault(tmp.path(), "clean", None);
    ok(&clean);
    let (o, out) = train_with_fault(tmp.path(), "skewed", Some("group-norm:disagree"));
    ok(&o);
    let err = stderr(&o);
    let warning = "warning: the group-norm kernels are off on the CPU in f32";
    assert_eq!(err.matches(warning).count(), 1, "{err}");
    assert!(
        err.contains("differ from the composed op's by 1.0"),
        "{err}"
    );
    let k = recorded(&out, "group-norm");
    assert_eq!(k["state"], "off", "{k}");
    assert_eq!(recorded(&out, "attention")["state"], "checked");
    // The composed op trains the same run (the skew never reached it).
    let (a, b) = (losses(&clean_out), losses(&out));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "losses {a:?} vs {b:?}");
    }
}

#[test]
fn a_family_whose_launch_fails_at_its_check_is_switched_off() {
    let tmp = tempfile::tempdir().unwrap();
    let (o, out) = train_with_fault(tmp.path(), "run", Some("geglu:fail"));
    ok(&o);
    let err = stderr(&o);
    assert!(err.contains("the geglu kernels are off"), "{err}");
    assert!(err.contains("it failed: injected launch failure"), "{err}");
    assert_eq!(recorded(&out, "geglu")["state"], "off");
}

#[test]
fn a_launch_that_fails_mid_run_hands_over_to_the_composed_op() {
    let tmp = tempfile::tempdir().unwrap();
    // The check launches the attention kernel 3 times; the tiny U-Net many times a step.
    let (o, out) = train_with_fault(tmp.path(), "run", Some("attention:fail-after=12"));
    ok(&o);
    let err = stderr(&o);
    assert_eq!(
        err.matches("the attention kernels are off").count(),
        1,
        "{err}"
    );
    assert!(
        err.contains("a launch failed: injected launch failure"),
        "{err}"
    );
    let k = recorded(&out, "attention");
    assert_eq!(k["state"], "off", "{k}");
    assert!(
        k["why"].as_str().unwrap().contains("a launch failed"),
        "{k}"
    );
    assert_eq!(losses(&out).len(), 4);
}

// ---- magictailor doctor ---------------------------------------------------------------

fn doctor(args: &[&str], fault: Option<&str>) -> Output {
    let mut c = bin_command("doctor", args);
    if let Some(f) = fault {
        c.env("MAGICTAILOR_KERNEL_FAULT", f);
    }
    c.output().unwrap()
}

#[test]
fn doctor_checks_the_cpu_kernels_and_passes() {
    let o = doctor(&[], None);
    ok(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in ["Build", "Device", "Kernels", "Hub", "All checks passed."] {
        assert!(text.contains(needle), "{needle} in:\n{text}");
    }
    for family in ["attention", "group-norm", "layer-norm", "geglu"] {
        let row = text.lines().find(|l| l.trim_start().starts_with(family));
        let row = row.unwrap_or_else(|| panic!("no {family} row in:\n{text}"));
        assert!(row.contains(" ok ") && row.contains(" vs "), "{row}");
    }
    if !cfg!(feature = "cuda") {
        assert!(text.contains("no GPU support in this build"), "{text}");
    }
}

#[test]
fn doctor_json_is_one_object_for_bug_reports() {
    let o = doctor(&["--json", "--device", "cpu"], None);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["device"]["name"], "cpu");
    assert_eq!(v["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["build"]["commit"].as_str().is_some_and(|c| !c.is_empty()));
    let kernels = v["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 4, "{kernels:?}");
    for k in kernels {
        assert_eq!(k["state"], "checked", "{k}");
        let case = &k["unet_case"];
        assert!(case["kernel_seconds"].as_f64().unwrap() > 0.0, "{k}");
        assert!(case["max_rel_err"].as_f64().unwrap() <= k["tolerance"].as_f64().unwrap());
    }
    assert!(v["hub"]["cache"].as_str().is_some());
    assert!(v["training_estimate"].is_null(), "only with --estimate");
}

#[test]
fn doctor_fails_with_exit_1_naming_what_failed() {
    let o = doctor(&["--json"], Some("layer-norm:disagree"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let problems = v["problems"].to_string();
    assert!(
        problems.contains("layer-norm kernels in f32: off"),
        "{problems}"
    );
    if !cfg!(feature = "cuda") {
        let o = doctor(&["--device", "cuda"], None);
        assert_eq!(o.status.code(), Some(1));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("built without CUDA"), "{text}");
    }
}
