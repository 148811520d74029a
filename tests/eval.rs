//! `magictailor eval`: CLIP and DINOv2 features against transformers on tiny random models
//! (fixtures from scripts/make_eval_fixtures.py), the metric's invariants, and the command
//! end to end on the tiny SD model with the fixture adapters.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use magictailor::eval::clip::{unit, Clip};
use magictailor::eval::dino::Dino;
use magictailor::eval::metrics::cosine;

fn eval_reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("eval_parity.safetensors"), &Device::Cpu)
        .expect("eval parity fixture")
}

fn fixture_image(name: &str) -> image::RgbImage {
    read_png(&fixtures().join("eval_images").join(format!("{name}.png")))
}

fn clip() -> Clip {
    Clip::load(&fixtures().join("tiny-clip"), &Device::Cpu).unwrap()
}

fn dino() -> Dino {
    Dino::load(&fixtures().join("tiny-dinov2"), &Device::Cpu).unwrap()
}

/// The preprocessed pictures of both fixture images, `[2, 3, s, s]`.
fn batch(p: &magictailor::eval::preprocess::Preprocess) -> Tensor {
    let t: Vec<Tensor> = ["a", "b"]
        .iter()
        .map(|n| p.tensor(&fixture_image(n), None, &Device::Cpu).unwrap())
        .collect();
    Tensor::stack(&t, 0).unwrap()
}

/// Preprocessing equals transformers' PIL processors to float rounding: the bicubic resize
/// is PIL's to the byte.
#[test]
fn preprocessing_matches_the_transformers_processors() {
    let r = eval_reference();
    let (c, d) = (clip(), dino());
    for (i, name) in ["a", "b"].iter().enumerate() {
        let mine = batch(&c.preprocess).get(i).unwrap().unsqueeze(0).unwrap();
        let diff = max_abs_diff(&mine, &r[&format!("clip.pixel_values.{name}")]);
        assert!(diff <= 1e-6, "CLIP pixels of {name}: {diff}");
        let mine = batch(&d.preprocess).get(i).unwrap().unsqueeze(0).unwrap();
        let diff = max_abs_diff(&mine, &r[&format!("dino.pixel_values.{name}")]);
        assert!(diff <= 1e-6, "DINOv2 pixels of {name}: {diff}");
    }
}

#[test]
fn clip_image_and_text_features_match_transformers() {
    let r = eval_reference();
    let c = clip();
    let want = unit(&r["clip.image_embeds"]).unwrap();
    let pixels = Tensor::cat(&[&r["clip.pixel_values.a"], &r["clip.pixel_values.b"]], 0).unwrap();
    let diff = max_abs_diff(&c.image_features(&pixels).unwrap(), &want);
    assert!(diff <= 1e-5, "image features from the same pixels: {diff}");
    let diff = max_abs_diff(&c.image_features(&batch(&c.preprocess)).unwrap(), &want);
    assert!(diff <= 1e-5, "image features from the files: {diff}");

    let prompts = [
        "a photo of a person with hair, in the snow",
        "a red dog on the beach",
    ];
    let want = unit(&r["clip.text_embeds"]).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = c.token_ids(prompt).unwrap();
        let ref_ids: Vec<u32> = (r[&format!("clip.input_ids.{i}")].flatten_all().unwrap())
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(ids, ref_ids, "token ids of {prompt:?}");
        let diff = max_abs_diff(
            &c.text_features(prompt).unwrap(),
            &want.get(i).unwrap().unsqueeze(0).unwrap(),
        );
        assert!(diff <= 1e-5, "text features of {prompt:?}: {diff}");
    }
}

/// The tiny DINOv2 has a 4x4 position table and sees 7x7 patches: its bicubic resize is
/// checked too.
#[test]
fn dino_cls_features_match_transformers() {
    let r = eval_reference();
    let d = dino();
    let pixels = Tensor::cat(&[&r["dino.pixel_values.a"], &r["dino.pixel_values.b"]], 0).unwrap();
    let want = &r["dino.cls"];
    let diff = max_abs_diff(&d.cls_token(&pixels).unwrap(), want);
    assert!(
        diff <= 1e-5 * max_abs(want).max(1.0),
        "CLS from the same pixels: {diff}"
    );
    let diff = max_abs_diff(
        &d.features(&batch(&d.preprocess)).unwrap(),
        &unit(want).unwrap(),
    );
    assert!(diff <= 1e-5, "unit CLS from the files: {diff}");
}

/// Features have the projection's / hidden size's width, an image is its own best match
/// (cosine 1), and a batch's order does not change any image's features.
#[test]
fn features_have_their_shapes_cosine_one_and_ignore_batch_order() {
    let (c, d) = (clip(), dino());
    let a = c
        .preprocess
        .tensor(&fixture_image("a"), None, &Device::Cpu)
        .unwrap();
    let b = c
        .preprocess
        .tensor(&fixture_image("b"), None, &Device::Cpu)
        .unwrap();
    let ab = c
        .image_features(&Tensor::stack(&[&a, &b, &a], 0).unwrap())
        .unwrap();
    let ba = c
        .image_features(&Tensor::stack(&[&b, &a], 0).unwrap())
        .unwrap();
    assert_eq!(ab.dims(), [3, 16]);
    let rows = ab.to_vec2::<f32>().unwrap();
    let swapped = ba.to_vec2::<f32>().unwrap();
    assert!((cosine(&rows[0], &rows[2]) - 1.0).abs() < 1e-6);
    assert!(cosine(&rows[0], &rows[1]) < 0.9999);
    for (x, y) in rows[0]
        .iter()
        .zip(&swapped[1])
        .chain(rows[1].iter().zip(&swapped[0]))
    {
        assert!((x - y).abs() < 1e-6);
    }
    let pix = batch(&d.preprocess);
    let f = d.features(&pix).unwrap();
    assert_eq!(f.dims(), [2, 32]);
    let rows = f.to_vec2::<f32>().unwrap();
    assert!((cosine(&rows[0], &rows[0]) - 1.0).abs() < 1e-6);
    assert!((cosine(&rows[0], &rows[1]) - cosine(&rows[1], &rows[0])).abs() < 1e-7);
}

// ---- The command --------------------------------------------------------------------

/// A trained-looking folder (fixture LoRA and embeddings, class words person/hair) whose
/// magictailor.json records the pair folder it was "trained" on.
fn trained(root: &Path) -> (PathBuf, PathBuf) {
    let pair = pair_folder(root, &PairSpec::training());
    let dir = fixture_run(root, serde_json::json!({"config": {"instance_dir": pair}}));
    (dir, pair)
}

fn prompts_file(root: &Path) -> PathBuf {
    let f = root.join("prompts.txt");
    std::fs::write(
        &f,
        "# group: snow\n{}, in the snow\n# group: decoupled\n<v0>\n",
    )
    .unwrap();
    f
}

/// `eval` with the tiny models, 2 seeds, 3 steps at 64 px.
fn eval_args<'a>(dir: &'a str, prompts: &'a str) -> Vec<&'a str> {
    let clip: &'static str = Box::leak(fixture("tiny-clip").into_boxed_str());
    let dino: &'static str = Box::leak(fixture("tiny-dinov2").into_boxed_str());
    vec![
        "--model-dir",
        dir,
        "--prompts-file",
        prompts,
        "--seeds",
        "0..1",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--batch-size",
        "2",
        "--clip-model",
        clip,
        "--dino-model",
        dino,
        "--device",
        "cpu",
    ]
}

fn json_out(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stderr(o)))
}

/// Draws 2 prompts x 2 seeds, scores them and writes metrics.json, summary.md and a grid
/// per prompt; a second run reuses the images (it never loads the diffusion model: a bad
/// --model does not matter) and gives the same numbers; other settings over the same
/// images are refused.
#[test]
fn eval_draws_scores_writes_and_reuses() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = trained(tmp.path());
    let prompts = prompts_file(tmp.path());
    let (d, p) = (dir.to_str().unwrap(), prompts.to_str().unwrap());
    let first = run_bin(
        "eval",
        &with_args(eval_args(d, p), &["--json", "--segment", "none"]),
    );
    ok(&first);
    let m = json_out(&first);
    let out = dir.join("eval/k0");
    // Reports named by the segmentation: an attention run's are never overwritten.
    for f in [
        "metrics-none.json",
        "summary-none.md",
        "grids-none/prompt00.png",
        "grids-none/prompt01.png",
        "prompt01/seed01.png",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(
        !out.join("metrics.json").exists(),
        "the attention run's name stays free"
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&read_bytes(&out.join("metrics-none.json"))).unwrap();
    assert_eq!(on_disk, m);
    assert_eq!(m["generated_segmentation"], "none");
    assert_eq!(m["reference_segmentation"], "masks");
    assert_eq!(m["images"].as_array().unwrap().len(), 4);
    assert_eq!(
        m["prompts"][0]["class_prompt"],
        "person with hair, in the snow"
    );
    // Overall covers the prompt naming both samples; the decoupled one has only "person".
    assert_eq!(m["overall"]["images"], 2);
    assert_eq!(m["prompts"][1]["in_overall"], false);
    let decoupled = &m["prompts"][1]["summary"];
    assert!(decoupled["clip_i_per_sample"].get("hair").is_none());
    assert_eq!(decoupled["clip_i_per_sample"]["person"]["n"], 2);
    for key in ["clip_t", "clip_i", "dino"] {
        let s = &m["overall"][key];
        let mean = s["mean"].as_f64().unwrap();
        assert!(
            (-1.0..=1.0).contains(&mean) && s["std"].as_f64().unwrap() >= 0.0,
            "{key}: {s}"
        );
    }
    assert_eq!(m["groups"][0]["name"], "snow");
    assert!(
        String::from_utf8_lossy(&read_bytes(&out.join("summary-none.md")))
            .contains("| **overall** | 2 |")
    );

    let image = read_bytes(&out.join("prompt00/seed00.png"));
    let again = run_bin(
        "eval",
        &with_args(
            eval_args(d, p),
            &["--json", "--model", "/no/such/model", "--segment", "none"],
        ),
    );
    ok(&again);
    assert_eq!(json_out(&again)["overall"], m["overall"]);
    assert_eq!(read_bytes(&out.join("prompt00/seed00.png")), image);

    // The default cuts generated images by the base model's attention: CLIP-T (whole
    // images) is unchanged, CLIP-I and DINO are scored on the segments.
    let segmented = run_bin("eval", &with_args(eval_args(d, p), &["--json"]));
    ok(&segmented);
    let s = json_out(&segmented);
    assert_eq!(s["generated_segmentation"], "attention");
    assert_eq!(s["overall"]["clip_t"], m["overall"]["clip_t"]);
    for key in ["clip_i", "dino"] {
        let mean = s["overall"][key]["mean"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&mean), "{key}: {}", s["overall"][key]);
    }

    let mut other = eval_args(d, p);
    set_arg(&mut other, "--steps", "4");
    let refused = run_bin("eval", &with_args(other, &["--quiet"]));
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("other settings"),
        "{}",
        stderr(&refused)
    );
}

#[test]
fn eval_refuses_bad_input_naming_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = trained(tmp.path());
    let prompts = prompts_file(tmp.path());
    let (d, p) = (dir.to_str().unwrap(), prompts.to_str().unwrap());
    let fails = |args: Vec<&str>, needle: &str| {
        let o = run_bin("eval", &with_args(args, &["--quiet"]));
        assert!(!o.status.success(), "{needle}: succeeded");
        assert!(
            stderr(&o).contains(needle),
            "wanted {needle:?} in: {}",
            stderr(&o)
        );
        assert!(
            !dir.join("eval").exists(),
            "{needle}: wrote images before failing"
        );
    };
    let missing = tmp.path().join("nowhere").to_string_lossy().into_owned();
    let mut a = eval_args(d, p);
    set_arg(&mut a, "--clip-model", &missing);
    fails(a, "--clip-model");
    let mut a = eval_args(d, p);
    set_arg(&mut a, "--dino-model", &missing);
    fails(a, "--dino-model");
    // A folder that is not a CLIP folder (the DINOv2 one has no tokenizer.json).
    let mut a = eval_args(d, p);
    let dino = fixture("tiny-dinov2");
    set_arg(&mut a, "--clip-model", &dino);
    fails(a, "tokenizer.json");

    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    fails(eval_args(bare.to_str().unwrap(), p), "magictailor.json");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    fails(eval_args(d, empty.to_str().unwrap()), "no prompts");

    let unknown = tmp.path().join("unknown.txt");
    std::fs::write(&unknown, "<v7> on the beach\n").unwrap();
    fails(eval_args(d, unknown.to_str().unwrap()), "<v7>");

    let mut a = eval_args(d, p);
    a.extend(["--instance-dir", &missing]);
    fails(a, "--instance-dir");
}

/// Without --prompts, eval runs the paper's prompts, built into the binary, from any
/// working directory (was: a path relative to the repository).
#[test]
fn the_papers_prompts_are_built_in() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = trained(tmp.path());
    let d = dir.to_str().unwrap();
    let mut args = eval_args(d, "unused");
    args.drain(2..4); // no --prompts
    set_arg(&mut args, "--seeds", "1");
    let o = bin_command("eval", &with_args(args, &["--json", "--segment", "none"]))
        .current_dir(tmp.path())
        .output()
        .unwrap();
    ok(&o);
    let m = json_out(&o);
    assert_eq!(
        m["prompts"].as_array().unwrap().len(),
        22,
        "Table 5's 20 and the 2 decoupled"
    );
    let source = m["protocol"]["prompts_file"].as_str().unwrap();
    assert!(source.starts_with("built-in"), "{source}");
}

/// `compare` over two methods x two pairs: Table 1's numbers are each method's mean ± std
/// (population) over its pairs' overall means; the per-group tables and the page are
/// written, and every image the page shows exists; runs evaluated under another protocol,
/// or the same method and pair twice, are refused.
#[test]
fn compare_puts_methods_side_by_side_over_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts_file(tmp.path());
    let p = prompts.to_str().unwrap();
    let pairs_dir = tmp.path().join("pairs");
    let mut runs = Vec::new();
    // Two pairs with other reference images, so the pairs' scores differ.
    let specs = [
        PairSpec::training(),
        PairSpec::discs((64, 64), Format::Png, 1),
    ];
    for (spec, (concept, component)) in specs
        .into_iter()
        .zip([("person_a", "hair_a"), ("person_b", "hair_b")])
    {
        let mut spec = spec;
        (spec.samples[0].0, spec.samples[1].0) = (concept, component);
        let pair = pair_folder(&pairs_dir, &spec);
        for method in ["magictailor", "ti"] {
            let root = tmp.path().join(format!("{method}-{concept}"));
            let record = serde_json::json!({
                "config": {"instance_dir": pair}, "method": {"name": method}
            });
            let dir = fixture_run(&root, record);
            // "TI" draws without the adapters, so the methods' images differ.
            if method == "ti" {
                std::fs::remove_file(dir.join("pytorch_lora_weights.safetensors")).unwrap();
            }
            let mut a = eval_args(dir.to_str().unwrap(), p);
            a.extend(["--segment", "none"]);
            // TI's first evaluation at another guidance.
            if method == "ti" {
                a.extend(["--guidance", "3.0"]);
            }
            ok(&run_bin("eval", &a));
            runs.push(dir);
        }
    }
    let out = tmp.path().join("cmp");
    let run_args = |runs: &[PathBuf], extra: &[&str]| {
        let mut a: Vec<String> = runs.iter().map(|r| r.display().to_string()).collect();
        a.extend(["--segment", "none", "--out-dir"].map(String::from));
        a.push(out.display().to_string());
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // TI was evaluated at another guidance: refused, naming the setting.
    let a = run_args(&runs, &["--json"]);
    let o = run_bin("compare", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("evaluated differently (protocol"),
        "{}",
        stderr(&o)
    );

    // Re-evaluate TI's runs under the same protocol, into their own folders.
    for dir in runs.iter().filter(|d| d.to_string_lossy().contains("ti-")) {
        let _ = std::fs::remove_dir_all(dir.join("eval"));
        let mut a = eval_args(dir.to_str().unwrap(), p);
        a.extend(["--segment", "none"]);
        ok(&run_bin("eval", &a));
    }
    let o = run_bin("compare", &a.iter().map(String::as_str).collect::<Vec<_>>());
    ok(&o);
    let report = json_out(&o);
    let methods = report["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["method"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["ti", "magictailor"],
        "Table 1's order: baselines, then ours"
    );
    for m in methods {
        let name = m["method"].as_str().unwrap();
        assert_eq!(m["pairs"].as_array().unwrap().len(), 2);
        let means: Vec<f64> = (report["runs"].as_array().unwrap().iter())
            .filter(|r| r["method"] == name)
            .map(|r| r["overall"]["dino"]["mean"].as_f64().unwrap())
            .collect();
        let mean = (means[0] + means[1]) / 2.0;
        let std = (means[0] - means[1]).abs() / 2.0;
        assert!(std > 0.0, "the pairs differ: {means:?}");
        let got = &m["overall"]["dino"];
        assert!(
            (got["mean"].as_f64().unwrap() - mean).abs() < 1e-12,
            "{got}"
        );
        assert!((got["std"].as_f64().unwrap() - std).abs() < 1e-12, "{got}");
        assert!(m["groups"]["snow"]["dino"]["mean"].is_number(), "{m}");
    }
    let md = std::fs::read_to_string(out.join("compare.md")).unwrap();
    for needle in [
        "## Table 1",
        "| ti | 2 |",
        "| magictailor | 2 |",
        "## snow",
        "DreamSim",
    ] {
        assert!(md.contains(needle), "compare.md lacks {needle:?}:\n{md}");
    }
    let html = std::fs::read_to_string(out.join("compare.html")).unwrap();
    assert!(html.contains("&lt;v0&gt;"), "prompts are escaped");
    let srcs: Vec<&str> = html
        .split("src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    // 2 pairs x (2 reference images + 2 prompts x 2 methods x 2 seeds).
    assert!(srcs.len() >= 2 * (2 + 8), "{} images", srcs.len());
    for s in srcs {
        assert!(
            out.join(s).is_file(),
            "compare.html shows {s}, which does not exist"
        );
    }

    // The same method and pair twice.
    let twice = [runs[0].clone(), runs[0].clone()];
    let a = run_args(&twice, &[]);
    let o = run_bin("compare", &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("are both --method magictailor on the pair"),
        "{}",
        stderr(&o)
    );
}

/// `eval --retouch`: the retouched images (references from the pair folder) go to their
/// own folder, each beside its layout; the report records the stage; the same folder
/// with other retouch settings is refused.
#[test]
fn eval_retouch_scores_retouched_images_in_their_own_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = trained(tmp.path());
    let prompts = prompts_file(tmp.path());
    let (d, p) = (dir.to_str().unwrap(), prompts.to_str().unwrap());
    let args = with_args(
        eval_args(d, p),
        &["--json", "--segment", "none", "--retouch"],
    );
    let o = run_bin("eval", &args);
    ok(&o);
    let m = json_out(&o);
    let out = dir.join("eval/k0-retouch");
    for f in [
        "prompt00/seed00.png",
        "prompt00/seed00-layout.png",
        "metrics-none.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert!(!dir.join("eval/k0").exists());
    assert_eq!(m["protocol"]["retouch"]["layout_swap_steps"], 0);
    assert_eq!(m["images"].as_array().unwrap().len(), 4);
    let mut other = args.clone();
    other.extend(["--swap-layout-steps", "1"]);
    let refused = run_bin("eval", &other);
    assert!(
        stderr(&refused).contains("other settings"),
        "{}",
        stderr(&refused)
    );
}
