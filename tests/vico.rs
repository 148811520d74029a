//! ViCo (`train --method vico`, `infer --reference`): where the blocks sit, their and the
//! pseudo-word's gradients through both paths against finite differences, blocks that
//! pass their input through leave sampling unchanged bit for bit, and a run on a pair and
//! on a one-sample folder trains only the rows and blocks and samples with references.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use magictailor::infer::vico::Visual;
use magictailor::infer::{sample, Weights};
use magictailor::model::loader::StableDiffusion;
use magictailor::model::nn::Ctx;
use magictailor::model::vico::{self, Blocks, Plug, Routing};
use magictailor::rng::seeded_normal;

/// person_k+hair_c: 2 + 2 discs on a background (80x64 PNG).
fn make_pair(root: &Path) -> std::path::PathBuf {
    pair_folder(root, &PairSpec::training())
}

#[test]
fn blocks_sit_in_the_decoders_even_transformers() {
    let sd = StableDiffusion::load(&tiny_sd(), &Device::Cpu, DType::F32).unwrap();
    let sites = vico::sites(&sd.unet);
    let paths: Vec<&str> = sites.iter().map(|s| s.path.as_str()).collect();
    // Running ids 8, 10, 12, 14 of SD's 16 transformers (6 down, 1 mid, 9 up).
    assert_eq!(
        paths,
        [
            "up_blocks.1.attentions.1",
            "up_blocks.2.attentions.0",
            "up_blocks.2.attentions.2",
            "up_blocks.3.attentions.1"
        ]
    );
    let widths: Vec<usize> = sites.iter().map(|s| s.dim).collect();
    assert_eq!(widths, [16, 16, 16, 8]);
}

/// The tiny model in f64 with two pseudo-words, blocks that are not zero, two drawn rows
/// and their two references.
struct Setup {
    sd: StableDiffusion,
    blocks: Blocks,
    rows: Var,
    ids: Tensor,
    x: Tensor,
    x_ref: Tensor,
    t: Tensor,
    w_out: Tensor,
}

fn setup() -> Setup {
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F64).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();
    let blocks = Blocks::init(&vico::sites(&sd.unet), 3, &dev, DType::F64).unwrap();
    let f64n = |seed, shape: &[usize]| {
        (seeded_normal(seed, shape, &dev).unwrap())
            .to_dtype(DType::F64)
            .unwrap()
    };
    let rows = Var::from_tensor(&f64n(1, &[2, 32])).unwrap();
    let ids: Vec<u32> = ["a photo of <v0>", "a dog with <v1>"]
        .iter()
        .flat_map(|p| sd.tokenizer.encode(p).unwrap())
        .collect();
    Setup {
        ids: Tensor::from_vec(ids, (2, 77), &dev).unwrap(),
        x: f64n(2, &[2, 4, 8, 8]),
        x_ref: f64n(6, &[2, 4, 8, 8]),
        t: Tensor::new(&[37f64, 801.], &dev).unwrap(),
        w_out: f64n(4, &[2, 4, 8, 8]),
        sd,
        blocks,
        rows,
    }
}

/// What one reference pass and drawn pass give: a scalar of the drawn rows' output, L_reg,
/// and L_reg's word and end-of-text maps per block.
struct Pass {
    main: Tensor,
    reg: Tensor,
    maps: Vec<(Tensor, Tensor)>,
}

fn pass(s: &Setup) -> Pass {
    let text = (s.sd.text_encoder)
        .forward(&s.ids, Some(s.rows.as_tensor()))
        .unwrap();
    let routing = Routing {
        refs_of: vec![vec![0], vec![1]],
        mask_token: vec![4, 4],
        reg_eot: Some(vec![5, 5]),
    };
    let plug = Plug::new(&s.blocks, routing);
    let ctx = Ctx {
        vico: Some(&plug),
        ..Ctx::default()
    };
    (s.sd.unet).forward(&s.x_ref, &s.t, &text, ctx).unwrap();
    plug.start_drawing().unwrap();
    let out = s.sd.unet.forward(&s.x, &s.t, &text, ctx).unwrap();
    let terms = plug.take_reg();
    assert_eq!(terms.len(), 4, "one L_reg term per block");
    Pass {
        main: (out * &s.w_out).unwrap().sum_all().unwrap(),
        reg: Tensor::stack(&terms, 0).unwrap().sum_all().unwrap(),
        maps: plug.take_reg_maps(),
    }
}

/// L_reg with the end-of-text maps held at `eot`: what its stop-gradient differentiates.
fn reg_against(maps: &[(Tensor, Tensor)], eot: &[Tensor]) -> f64 {
    let over_max = |m: &Tensor| m.broadcast_div(&m.max_keepdim(1).unwrap()).unwrap();
    (maps.iter().zip(eot))
        .map(|((word, _), e)| {
            let d = (over_max(word) - over_max(e)).unwrap();
            d.sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum()
}

/// d value / d var[idx] against a central difference; `value` reads a pass.
fn check(
    s: &Setup,
    name: &str,
    var: &Var,
    grad: &Tensor,
    idx: usize,
    value: &dyn Fn(&Pass) -> f64,
) {
    let analytic = grad.flatten_all().unwrap().to_vec1::<f64>().unwrap()[idx];
    let orig = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let h = 1e-5;
    let at = |delta: f64| {
        let mut v = orig.clone();
        v[idx] += delta;
        var.set(&Tensor::from_vec(v, var.shape().clone(), &Device::Cpu).unwrap())
            .unwrap();
        value(&pass(s))
    };
    let numeric = (at(h) - at(-h)) / (2.0 * h);
    var.set(&Tensor::from_vec(orig, var.shape().clone(), &Device::Cpu).unwrap())
        .unwrap();
    let err = (analytic - numeric).abs() / numeric.abs().max(1e-4);
    assert!(
        err < 1e-5,
        "{name}[{idx}]: analytic {analytic}, numeric {numeric}, rel err {err}"
    );
}

#[test]
fn block_and_row_gradients_match_finite_differences() {
    let s = setup();
    let base = pass(&s);
    assert!(base.reg.to_scalar::<f64>().unwrap() > 0.0);
    // The end-of-text maps pass no gradient: the difference quotient holds them fixed.
    let eot: Vec<Tensor> = base.maps.iter().map(|(_, e)| e.clone()).collect();
    let scalar = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    // L_reg reaches the rows only through the reference pass's cross-attention.
    let g = base.reg.backward().unwrap();
    let g_rows = g.get(s.rows.as_tensor()).expect("L_reg: no row gradient");
    for idx in [3, 40] {
        check(&s, "rows (L_reg)", &s.rows, g_rows, idx, &|p| {
            reg_against(&p.maps, &eot)
        });
    }
    let total = (&base.main + (&base.reg * 10.0).unwrap()).unwrap();
    let g = total.backward().unwrap();
    let value = |p: &Pass| scalar(&p.main) + 10.0 * reg_against(&p.maps, &eot);
    for idx in [3, 40] {
        let g_rows = g.get(s.rows.as_tensor()).unwrap();
        check(&s, "rows", &s.rows, g_rows, idx, &value);
    }
    let named = s.blocks.named();
    for (suffix, idx) in [
        (
            "up_blocks.1.attentions.1.image_cross_attention.attn2.to_k.weight",
            7,
        ),
        (
            "up_blocks.2.attentions.2.image_cross_attention.attn1.to_v.weight",
            5,
        ),
        (
            "up_blocks.3.attentions.1.image_cross_attention.norm2.weight",
            2,
        ),
        (
            "up_blocks.2.attentions.0.image_cross_attention.ff.net.0.proj.bias",
            9,
        ),
        (
            "up_blocks.3.attentions.1.image_cross_attention.attn2.to_out.0.bias",
            1,
        ),
    ] {
        let (name, var) = named.iter().find(|(n, _)| n == suffix).unwrap();
        let grad = g
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        check(&s, name, var, grad, idx, &value);
    }
}

/// A 64 px PNG of flat colour halves, for a reference.
fn write_reference(path: &Path) {
    let img = image::RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            image::Rgb([200, 40, 40])
        } else {
            image::Rgb([20, 90, 220])
        }
    });
    img.save(path).unwrap();
}

/// The tiny model (f32) knowing `<v0>` and `<v1>`, their rows, and new blocks with the
/// given number of references (flat colour PNGs in `dir`).
fn sampler(dir: &Path, references: usize) -> (StableDiffusion, Tensor, Visual) {
    let dev = Device::Cpu;
    let mut sd = StableDiffusion::load(&tiny_sd(), &dev, DType::F32).unwrap();
    sd.tokenizer
        .add_pseudo_words(&["<v0>".into(), "<v1>".into()])
        .unwrap();
    let rows = seeded_normal(1, (2, 32), &dev).unwrap();
    let references: Vec<_> = (0..references)
        .map(|i| dir.join(format!("ref{i}.png")))
        .collect();
    references.iter().for_each(|p| write_reference(p));
    let blocks = Blocks::init(&vico::sites(&sd.unet), 0, &dev, DType::F32).unwrap();
    (sd, rows, Visual::new(&blocks, references))
}

/// Sampling weights of the base model with `rows` and, optionally, ViCo.
fn weights<'a>(sd: &'a StableDiffusion, rows: &'a Tensor, vico: Option<&'a Visual>) -> Weights<'a> {
    Weights {
        sd,
        lora: None,
        tuned: None,
        extra_rows: Some(rows),
        extra_rows_2: None,
        token_table: None,
        token_table_2: None,
        vico,
    }
}

#[test]
fn blocks_that_pass_their_input_through_leave_sampling_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, rows, visual) = sampler(tmp.path(), 2);
    let (plain, with) = (
        weights(&sd, &rows, None),
        weights(&sd, &rows, Some(&visual)),
    );
    let latents = seeded_normal(5, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let draw = |w: Weights, prompt: &str| {
        sample(w, prompt, "", latents.clone(), 4, 7.5, false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for prompt in ["<v0> with <v1>, in the snow", "a photo of <v1>", "a dog"] {
        // Random blocks change the picture...
        assert_ne!(draw(with, prompt), draw(plain, prompt), "{prompt}");
    }
    visual.blocks.zero_outputs().unwrap();
    for prompt in ["<v0> with <v1>, in the snow", "a photo of <v1>", "a dog"] {
        // ...blocks whose branches output zero do not, to the bit.
        assert_eq!(draw(with, prompt), draw(plain, prompt), "{prompt}");
    }
}

#[test]
fn a_prompt_naming_a_word_without_a_reference_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (sd, rows, visual) = sampler(tmp.path(), 1);
    let latents = seeded_normal(5, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let w = weights(&sd, &rows, Some(&visual));
    let err = sample(w, "<v0> with <v1>", "", latents, 2, 7.5, false).unwrap_err();
    assert!(err.to_string().contains("--reference"), "{err}");
}

/// `train --method vico` on a pair and on a one-sample folder: only the rows and blocks
/// are written, the record says what ran, and the run samples with its references.
#[test]
fn vico_trains_and_samples_on_a_pair_and_on_one_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let pair = make_pair(tmp.path());
    let single = tmp.path().join("dog_a");
    std::fs::create_dir_all(&single).unwrap();
    for (k, f) in std::fs::read_dir(&pair)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("0_"))
        .enumerate()
    {
        std::fs::copy(&f, single.join(format!("0_{k}.png"))).unwrap();
    }
    for (dir, words) in [(&pair, 2), (&single, 1)] {
        let out = tmp.path().join(format!("run{words}"));
        let args = with_args(
            quiet_train_args(dir.to_str().unwrap(), out.to_str().unwrap(), &model),
            &["--method", "vico", "--steps", "2", "--images-per-step", "2"],
        );
        ok(&run_bin("train", &args));
        let blocks = magictailor::io::tensors::read_floats(
            &out.join("vico_blocks.safetensors"),
            &Device::Cpu,
            &[],
        )
        .unwrap();
        // 4 blocks of 3 norms (2 each), 2 attentions (5 each), a feed-forward (4).
        assert_eq!(
            blocks.len(),
            4 * 20,
            "{:?}",
            blocks.keys().take(3).collect::<Vec<_>>()
        );
        assert!(!out.join("pytorch_lora_weights.safetensors").exists());
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("magictailor.json")).unwrap()).unwrap();
        assert_eq!(record["method"]["name"], "vico");
        assert_eq!(record["method"]["vico"]["block_lr"], 1e-5);
        assert_eq!(
            record["method"]["vico"]["layers"][3],
            "up_blocks.3.attentions.1"
        );
        let refs = record["method"]["vico"]["references"].as_array().unwrap();
        assert_eq!(refs.len(), words);
        let log = read_log(&out);
        assert_eq!(log.len(), 2);
        assert!(log[1]["l_attn"].as_f64().unwrap() > 0.0, "L_reg is logged");
        let prompt = if words == 2 {
            "<v0> with <v1>"
        } else {
            "a photo of <v0>"
        };
        let png = out.join("sample.png");
        ok(&run_bin(
            "infer",
            &[
                "--model-dir",
                out.to_str().unwrap(),
                "--prompt",
                prompt,
                "--steps",
                "3",
                "--width",
                "64",
                "--height",
                "64",
                "--out",
                png.to_str().unwrap(),
            ],
        ));
        let text = png_text(&png);
        let refs = text["magictailor"].clone();
        assert!(refs.contains("\"references\":[\""), "{refs}");
        // More references than words would leave some unused: refused.
        let img = tmp.path().join("extra.png");
        write_reference(&img);
        let mut args = vec!["--model-dir", out.to_str().unwrap(), "--prompt", prompt];
        for _ in 0..=words {
            args.extend(["--reference", img.to_str().unwrap()]);
        }
        args.extend(["--out", png.to_str().unwrap()]);
        let o = run_bin("infer", &args);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("one --reference per word"),
            "{}",
            stderr(&o)
        );
        if words == 2 {
            // Many prompts and seeds in batches, with a step blend's layout stage.
            let prompts = tmp.path().join("prompts.txt");
            std::fs::write(&prompts, "<v0> with <v1>\na photo of <v1>\n").unwrap();
            let many = out.join("many");
            ok(&run_bin(
                "infer",
                &[
                    "--model-dir",
                    out.to_str().unwrap(),
                    "--prompts-file",
                    prompts.to_str().unwrap(),
                    "--seeds",
                    "0,1",
                    "--batch-size",
                    "2",
                    "--layout-steps",
                    "1",
                    "--steps",
                    "3",
                    "--width",
                    "64",
                    "--height",
                    "64",
                    "--out-dir",
                    many.to_str().unwrap(),
                    "--quiet",
                ],
            ));
            let manifest = std::fs::read_to_string(many.join("manifest.jsonl")).unwrap();
            assert_eq!(manifest.lines().count(), 4, "{manifest}");
        }
    }
}

/// Flags ViCo does not read are refused, and `--reference` needs blocks.
#[test]
fn vico_refuses_what_it_would_ignore() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    for extra in [
        &["--no-masks"][..],
        &["--no-flip"],
        &["--lambda-attn", "0.1"],
    ] {
        let mut args = quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model);
        args.extend(["--method", "vico"]);
        args.extend(extra);
        let o = run_bin("train", &args);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--method vico"), "{}", stderr(&o));
    }
    let img = tmp.path().join("r.png");
    write_reference(&img);
    let o = run_bin(
        "infer",
        &[
            "--model",
            &model,
            "--prompt",
            "a dog",
            "--reference",
            img.to_str().unwrap(),
            "--steps",
            "2",
            "--out",
            tmp.path().join("x.png").to_str().unwrap(),
        ],
    );
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("--reference"), "{}", stderr(&o));
    // Refused before any model is read: a missing model is not what it reports.
    let missing = tmp.path().join("no-model");
    let o = run_bin(
        "infer",
        &[
            "--model",
            missing.to_str().unwrap(),
            "--prompt",
            "a dog",
            "--reference",
            img.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--reference conditions"),
        "{}",
        stderr(&o)
    );
    // A checkpoint brings its own blocks.
    let o = run_bin(
        "infer",
        &[
            "--model-dir",
            out.to_str().unwrap(),
            "--checkpoint",
            "1",
            "--vico-blocks",
            img.to_str().unwrap(),
            "--prompt",
            "a dog",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vico-blocks"), "{}", stderr(&o));
}

/// A ViCo trainer updates only the rows and the blocks: after two steps the base U-Net
/// and text encoder give the same bits as before.
#[test]
fn training_leaves_the_base_model_untouched() {
    use magictailor::io::progress::Progress;
    use magictailor::train::{method::Method, trainer::Trainer, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let mut cfg = TrainConfig::new(pair, tmp.path().join("out"), tiny_sd());
    (cfg.method, cfg.steps, cfg.images_per_step, cfg.resolution) =
        (Method::Vico, Some(2), Some(2), 64);
    cfg.sample_every = Some(0);
    let mut t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    let names: Vec<String> = t.trainable().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.iter().all(|n| n == "rows" || n.starts_with("vico.")),
        "{names:?}"
    );
    assert_eq!(names.len(), 1 + 4 * 20);
    let probe = |t: &Trainer| {
        let dev = Device::Cpu;
        let ids: Vec<u32> = t.sd.tokenizer.encode("a photo of a dog").unwrap();
        let ids = Tensor::from_vec(ids, (1, 77), &dev).unwrap();
        let text = t.sd.text_encoder.forward(&ids, None).unwrap();
        let x = seeded_normal(9, (1, 4, 8, 8), &dev).unwrap();
        let ts = Tensor::new(&[500f32], &dev).unwrap();
        let out = t.sd.unet.forward(&x, &ts, &text, Ctx::default()).unwrap();
        [text, out].map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    };
    let before = probe(&t);
    let blocks_before = t.vico.as_ref().unwrap().vars()[5]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for _ in 0..2 {
        t.train_step().unwrap();
    }
    assert_eq!(probe(&t), before);
    let blocks_after = t.vico.as_ref().unwrap().vars()[5]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(blocks_before, blocks_after, "the blocks train");
}

/// One ViCo step against the authors' code written out in torch
/// (scripts/make_vico_fixture.py): the loss terms, the end-of-text positions, and the
/// gradients of the rows and of every block parameter (which a different Otsu mask at any
/// block would change); on SD 2.x and on SDXL (three sites, each block after its
/// transformer's last layer, rows in both encoders).
#[test]
fn a_step_matches_the_reference_written_in_torch() {
    step_matches_torch("vico_step.safetensors", &tiny_sd(), 4);
    let sdxl = fixtures().join("sdxl/tiny-sdxl");
    step_matches_torch("sdxl/vico_step.safetensors", sdxl.to_str().unwrap(), 3);
}

fn step_matches_torch(fixture: &str, model: &str, n_sites: usize) {
    use magictailor::train::objective::{Batch, Noised, TextParams};
    let dev = Device::Cpu;
    let r = candle_core::safetensors::load(fixtures().join(fixture), &dev).unwrap();
    let usizes = |name: &str| -> Vec<usize> {
        (r[name]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap())
        .into_iter()
        .map(|v| v as usize)
        .collect()
    };
    let mut sd = StableDiffusion::load(model, &dev, DType::F32).unwrap();
    let words = ["<v0>".to_string(), "<v1>".to_string()];
    sd.tokenizer.add_pseudo_words(&words).unwrap();
    if let Some((_, tok_2)) = &mut sd.text_encoder_2 {
        tok_2.add_pseudo_words(&words).unwrap();
    }
    let prompts = ["a photo of a <v0>", "a rendering of a <v1>"];
    let fixture_ids = |key: &str, tok: &magictailor::model::tokenizer::ClipTokenizer| {
        let ids = r[key].to_dtype(DType::U32).unwrap();
        for (row, prompt) in prompts.iter().enumerate() {
            let want = ids.get(row).unwrap().to_vec1::<u32>().unwrap();
            assert_eq!(tok.encode(prompt).unwrap(), want, "{key}");
        }
        ids
    };
    let ids = fixture_ids("ids", &sd.tokenizer);
    let ids_2 = (sd.text_encoder_2.as_ref()).map(|(_, tok)| fixture_ids("ids_2", tok));
    let blocks: std::collections::HashMap<String, Tensor> = (r.iter())
        .filter_map(|(k, v)| Some((k.strip_prefix("block.")?.to_string(), v.clone())))
        .collect();
    let sites = vico::sites(&sd.unet);
    assert_eq!(sites.len(), n_sites);
    let blocks = Blocks::from_tensors(&blocks, Path::new(fixture), &sites, &dev).unwrap();
    let rows = Var::from_tensor(&r["rows"]).unwrap();
    let rows_2 = r.get("rows_2").map(|t| Var::from_tensor(t).unwrap());
    let b = 2;
    let batch = Batch {
        pixels: Tensor::zeros(1, DType::F32, &dev).unwrap(),
        masks: Tensor::zeros((b, 1, 64, 64), DType::F32, &dev).unwrap(),
        ids,
        ids_2,
        token_pos: usizes("word_pos"),
        sample_of: vec![0, 1],
        n_samples: 2,
        roi: None,
        prior: 0,
        reference: None,
        posterior: None,
    };
    let noised = Noised {
        z_t: r["z_t"].clone(),
        eps: r["eps"].clone(),
        target: r["eps"].clone(),
        timesteps: usizes("t"),
        masks: Tensor::zeros((b, 1, 64, 64), DType::F32, &dev).unwrap(),
        reference: Some(r["reference"].clone()),
    };
    let text = TextParams {
        rows: rows.as_tensor(),
        table: None,
        rows_2: rows_2.as_ref().map(|v| v.as_tensor()),
        table_2: None,
    };
    let losses =
        magictailor::train::vico::vico_losses(&sd, &batch, &noised, text, &blocks, 5e-4).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    for (name, ours) in [
        ("loss", &losses.loss),
        ("l_diff", &losses.l_diff),
        ("l_reg", &losses.l_attn),
    ] {
        let (a, want) = (scalar(ours), scalar(&r[name]));
        assert!(
            (a - want).abs() <= 1e-5 * want.abs().max(1e-3),
            "{fixture}: {name}: {a} vs {want}"
        );
    }
    assert_eq!(
        magictailor::train::vico::end_of_text(&batch.ids, &sd.tokenizer).unwrap(),
        usizes("eot_pos")
    );
    let grads = losses.loss.backward().unwrap();
    let mut worst = 0f32;
    let mut checked = 0;
    let mut compare = |name: &str, var: &Var| {
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let want = &r[&format!("grad.{name}")];
        let err = magictailor::testkit::tolerance::rel_err(got, want);
        assert!(err < 1e-4, "{fixture}: {name}: relative error {err}");
        worst = worst.max(err);
        checked += 1;
    };
    compare("rows", &rows);
    if let Some(rows_2) = &rows_2 {
        compare("rows_2", rows_2);
    }
    for (name, var) in blocks.named() {
        compare(&name, var);
    }
    assert_eq!(checked, 1 + usize::from(rows_2.is_some()) + n_sites * 20);
    eprintln!("{fixture}: worst gradient error {worst:e}");
}

/// `batch --method vico` trains every pair folder of a directory, each into its own run
/// folder with the blocks.
#[test]
fn batch_trains_vico_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("pairs");
    make_pair(&root);
    let out = tmp.path().join("runs");
    let model = tiny_sd();
    let args = [
        "--pairs",
        root.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--model",
        &model,
        "--resolution",
        "64",
        "--method",
        "vico",
        "--steps",
        "1",
        "--images-per-step",
        "2",
        "--quiet",
    ];
    ok(&run_bin("batch", &args));
    let run = out.join("person_k+hair_c");
    assert!(run.join("vico_blocks.safetensors").is_file());
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("magictailor.json")).unwrap()).unwrap();
    assert_eq!(record["method"]["name"], "vico");
}

/// `eval` on a ViCo run draws its prompts with the run's references and scores them.
#[test]
fn eval_scores_a_vico_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_sd();
    let pair = make_pair(tmp.path());
    let out = tmp.path().join("run");
    let args = with_args(
        quiet_train_args(pair.to_str().unwrap(), out.to_str().unwrap(), &model),
        &["--method", "vico", "--steps", "1", "--images-per-step", "2"],
    );
    ok(&run_bin("train", &args));
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(&prompts, "{}, in the snow\n<v1>\n").unwrap();
    let (clip, dino) = (fixture("tiny-clip"), fixture("tiny-dinov2"));
    let o = run_bin(
        "eval",
        &[
            "--model-dir",
            out.to_str().unwrap(),
            "--prompts-file",
            prompts.to_str().unwrap(),
            "--seeds",
            "0",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--clip-model",
            &clip,
            "--dino-model",
            &dino,
            "--segment",
            "none",
            "--json",
        ],
    );
    ok(&o);
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["images"].as_array().unwrap().len(), 2, "{m}");
    let png = out.join("eval/k0/prompt00/seed00.png");
    assert!(png_text(&png)["magictailor"].contains("\"references\":[\""));
}

/// A clean draw (ViCo's, DreamBooth's) samples posteriors the pool encoded once: the
/// step's latents and references are what encoding them in the step gives.
#[test]
fn cached_posteriors_give_the_latents_encoding_gives() {
    use magictailor::io::progress::Progress;
    use magictailor::train::noise::StepNoise;
    use magictailor::train::objective::noised_latents;
    use magictailor::train::{method::Method, trainer::Trainer, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let pair = make_pair(tmp.path());
    let mut cfg = TrainConfig::new(pair, tmp.path().join("out"), tiny_sd());
    (cfg.method, cfg.steps, cfg.images_per_step, cfg.resolution) =
        (Method::Vico, Some(2), Some(2), 64);
    let t = Trainer::new(cfg, &Device::Cpu, Progress::Quiet).unwrap();
    assert!(t.recipe.draw.is_clean());
    let batch = t
        .pool
        .batch(&t.sd, &t.recipe.draw, 0, 1)
        .unwrap()
        .into_owned();
    assert!(batch.posterior.is_some());
    let sizes = t.pool.noise_sizes(&t.sd, 4).unwrap();
    let noised = |b: &magictailor::train::objective::Batch| {
        let noise = StepNoise::draw(0, 1, sizes);
        noised_latents(&t.sd, b, &t.cfg, &t.recipe.draw, 1, noise)
            .unwrap()
            .0
    };
    let cached = noised(&batch);
    let encoded = noised(&magictailor::train::objective::Batch {
        posterior: None,
        ..batch.clone()
    });
    let err = |a: &Tensor, b: &Tensor| magictailor::testkit::tolerance::rel_err(a, b);
    assert!(err(&cached.z_t, &encoded.z_t) < 1e-5);
    let refs = (cached.reference.unwrap(), encoded.reference.unwrap());
    assert!(err(&refs.0, &refs.1) < 1e-5);
    // Draws that augment encode every step.
    let dreambooth = TrainConfig {
        method: Method::DreamBooth,
        ..TrainConfig::default()
    };
    assert!(magictailor::train::method::Recipe::new(&dreambooth, 4)
        .draw
        .is_clean());
    assert!(
        !magictailor::train::method::Recipe::new(&TrainConfig::default(), 4)
            .draw
            .is_clean()
    );
}
