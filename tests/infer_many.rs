//! `infer` at scale (`--prompts-file`, `--seeds`, `--batch-size`, `--grid`) and the
//! Layout-and-Retouch step blend (`--layout-steps`), on the tiny fixture model with the
//! fixture adapters.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A trained-looking folder: the fixture LoRA and embeddings, class words person/hair.
fn trained(root: &Path) -> PathBuf {
    fixture_run(root, serde_json::json!({}))
}

const SIZE: [&str; 6] = ["--steps", "6", "--width", "64", "--height", "64"];

/// `infer` with the common size and steps, quietly.
fn infer(args: &[&str]) -> std::process::Output {
    run_bin("infer", &[args, &SIZE, &["--quiet"]].concat())
}

fn single(model_dir: &Path, prompt: &str, seed: &str, out: &Path) -> Vec<u8> {
    let dir = model_dir.to_str().unwrap();
    let o = infer(&[
        "--model-dir",
        dir,
        "--prompt",
        prompt,
        "--seed",
        seed,
        "--out",
        out.to_str().unwrap(),
    ]);
    ok(&o);
    read_bytes(out)
}

/// 2 prompts x 3 seeds in batches of 2: each image has the bytes `infer --seed` draws
/// alone, the manifest lists all six, a contact sheet per prompt; a re-run redraws only
/// what is missing.
#[test]
fn a_prompts_file_draws_every_seed_like_single_runs_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained(tmp.path());
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "{}, in the snow\n# a comment\n\n<v1>\n").unwrap();
    let out = tmp.path().join("many");
    let args = [
        "--model-dir",
        dir.to_str().unwrap(),
        "--prompts-file",
        prompts.to_str().unwrap(),
        "--seeds",
        "0..2",
        "--batch-size",
        "2",
        "--grid",
        "--out-dir",
        out.to_str().unwrap(),
    ];
    ok(&infer(&args));
    let files = |p: usize, s: usize| out.join(format!("prompt{p:02}/seed{s:02}.png"));
    // Seed 2 was second batch's only image; seed 1 the first batch's second.
    for (p, prompt, s) in [(0, "<v0> with <v1>, in the snow", 2), (1, "<v1>", 1)] {
        let alone = single(&dir, prompt, &s.to_string(), &tmp.path().join("alone.png"));
        assert!(
            read_bytes(&files(p, s)) == alone,
            "prompt {p} seed {s} differs from a single run"
        );
    }
    let manifest: Vec<serde_json::Value> = std::fs::read_to_string(out.join("manifest.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(manifest.len(), 6);
    assert_eq!(manifest[4]["file"], "prompt01/seed01.png");
    assert_eq!(manifest[4]["prompt"], "<v1>");
    assert_eq!(manifest[0]["steps"], 6);
    assert!(manifest[0]["lora"]
        .as_str()
        .unwrap()
        .ends_with("pytorch_lora_weights.safetensors"));
    // 3 seeds in one row: the minimum width, a 26 px title, 20 px header, 20 px label.
    let sheet = read_png(&out.join("prompt00/grid.png"));
    assert_eq!(sheet.dimensions(), (420, 16 + 26 + 20 + 20 + 64));

    let (gone, kept) = (files(1, 2), files(0, 0));
    let redrawn = read_bytes(&gone);
    std::fs::remove_file(&gone).unwrap();
    std::fs::write(&kept, b"not redrawn").unwrap();
    let args: Vec<&str> = args.iter().copied().filter(|a| *a != "--grid").collect();
    ok(&infer(&args));
    assert!(
        read_bytes(&gone) == redrawn,
        "a missing image is redrawn the same"
    );
    assert_eq!(
        read_bytes(&kept),
        b"not redrawn",
        "an existing image is skipped"
    );
}

/// K = 0 is plain sampling; K = steps is the base model on the class-word prompt; in
/// between, something else again.
#[test]
fn layout_steps_blend_the_base_model_into_the_first_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained(tmp.path());
    let d = dir.to_str().unwrap();
    let draw = |extra: &[&str], name: &str| {
        let out = tmp.path().join(name);
        let base = [
            "--model-dir",
            d,
            "--prompt",
            "<v0> with <v1>",
            "--out",
            out.to_str().unwrap(),
        ];
        ok(&infer(&[&base, extra].concat()));
        read_png(&out) // pixels: the PNG's text says how each was made
    };
    let plain = draw(&[], "plain.png");
    assert!(draw(&["--layout-steps", "0"], "k0.png") == plain);
    let all = draw(&["--layout-steps", "6"], "k6.png");
    let base_out = tmp.path().join("base.png");
    let model = tiny_sd();
    let base = [
        "--model",
        &model,
        "--prompt",
        "person with hair",
        "--out",
        base_out.to_str().unwrap(),
    ];
    ok(&infer(&base));
    assert!(
        all == read_png(&base_out),
        "K = steps is the base model on the class prompt"
    );
    let half = draw(&["--layout-steps", "3"], "k3.png");
    assert!(half != plain && half != all);
}

fn refused(args: &[&str], needle: &str) {
    let o = infer(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn bad_prompt_lists_and_blends_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = trained(tmp.path());
    let d = dir.to_str().unwrap();
    let out = tmp.path().join("o");
    let o = out.to_str().unwrap();
    let file = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let empty = file("empty.txt", "\n# nothing\n");
    refused(
        &["--model-dir", d, "--prompts-file", &empty, "--out-dir", o],
        "empty.txt",
    );
    let unknown = file("unknown.txt", "{}\n<v7> on the moon\n");
    refused(
        &["--model-dir", d, "--prompts-file", &unknown, "--out-dir", o],
        "<v7> on the moon",
    );
    assert!(
        !out.exists(),
        "nothing is drawn before every prompt is checked"
    );
    let good = file("good.txt", "{}\n");
    refused(
        &[
            "--model-dir",
            d,
            "--prompts-file",
            &good,
            "--seeds",
            "3..1",
            "--out-dir",
            o,
        ],
        "--seeds",
    );
    refused(
        &["--model-dir", d, "--prompt", "<v0>", "--layout-steps", "7"],
        "more than --steps",
    );
    let (model, embeds) = (tiny_sd(), fixture("learned_embeds.safetensors"));
    let no_record = [
        "--model",
        &model,
        "--embeds",
        &embeds,
        "--prompt",
        "<v0>",
        "--layout-steps",
        "2",
    ];
    refused(&no_record, "--model-dir");
}

/// Seed lists too long to be meant are refused, not allocated (a panic before).
#[test]
fn absurd_seed_counts_are_refused() {
    use magictailor::infer::prompts::{parse_list, parse_seeds};
    assert_eq!(parse_seeds("0..3,7").unwrap(), [0, 1, 2, 3, 7]);
    for spec in ["0..18446744073709551615", "0..100000", "5,0..99999"] {
        let e = parse_seeds(spec).unwrap_err().to_string();
        assert!(e.contains("more than 100000 seeds"), "{spec}: {e}");
    }
    assert_eq!(parse_seeds("0..99999").unwrap().len(), 100_000);
    let e = parse_list("200,x", "--timesteps").unwrap_err().to_string();
    assert!(
        e.starts_with("--timesteps \"200,x\": expected numbers"),
        "{e}"
    );
}
