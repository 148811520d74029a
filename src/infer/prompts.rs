//! Prompt files and number lists as every command reads them: `infer --prompts-file`,
//! `eval --prompts-file`, `train --sample-prompts-file`, and the `--seeds`-style lists.

use std::path::Path;

use crate::error::{Error, Result};

/// What `{}` in a prompts file stands for unless `--placeholder` says otherwise: the
/// concept with its component.
pub const PLACEHOLDER: &str = "<v0> with <v1>";

/// One prompt per non-blank line of `file` (`#` starts a comment line); `{}` stands for
/// `placeholder`. `flag` names the option in the error for an empty file.
pub fn read_prompts(file: &Path, placeholder: &str, flag: &str) -> Result<Vec<String>> {
    Ok(read_grouped_prompts(file, placeholder, flag)?
        .into_iter()
        .map(|(_, p)| p)
        .collect())
}

/// [`read_prompts`], each prompt with the group a `# group: NAME` line above it names
/// ("ungrouped" before any).
pub fn read_grouped_prompts(
    file: &Path,
    placeholder: &str,
    flag: &str,
) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::read(file, e))?;
    parse_grouped_prompts(&text, placeholder, &format!("{flag} {}", file.display()))
}

/// [`read_grouped_prompts`] on the text of a prompts file, which `what` names.
pub fn parse_grouped_prompts(
    text: &str,
    placeholder: &str,
    what: &str,
) -> Result<Vec<(String, String)>> {
    let mut group = "ungrouped".to_string();
    let mut prompts = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(g) = comment.trim().strip_prefix("group:") {
                group = g.trim().to_string();
            }
        } else if !line.is_empty() {
            prompts.push((group.clone(), line.replace("{}", placeholder)));
        }
    }
    if prompts.is_empty() {
        return Err(Error::usage(format!(
            "{what}: the file has no prompts (one per line)."
        )));
    }
    Ok(prompts)
}

/// More numbers than this is a typo, not a protocol (the paper uses 32 seeds).
const MAX_SEEDS: u64 = 100_000;

/// `values` as a list flag takes them: `0,1`, with runs of three or more consecutive
/// numbers as an inclusive range (`0..31`).
pub fn list_spec(values: &[u64]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        if j >= i + 2 {
            parts.push(format!("{}..{}", values[i], values[j]));
        } else {
            parts.extend(values[i..=j].iter().map(u64::to_string));
        }
        i = j + 1;
    }
    parts.join(",")
}

fn too_many(spec: &str) -> Error {
    Error::usage(format!(
        "--seeds {spec}: more than {MAX_SEEDS} seeds; the paper's protocol uses 32 (0..31)."
    ))
}

/// `0..31` (inclusive, as the paper counts its 32 seeds), `3,5,8`, or a mix: `0..3,10`.
pub fn parse_seeds(spec: &str) -> Result<Vec<u64>> {
    parse_list(spec, "--seeds")
}

/// A list of whole numbers as every list flag takes them: `0..31` (inclusive), `3,5,8`,
/// or a mix; `flag` names it in errors.
pub fn parse_list(spec: &str, flag: &str) -> Result<Vec<u64>> {
    let bad = || {
        Error::usage(format!(
            "{flag} {spec:?}: expected numbers like 0..31 (inclusive) or 0,4,7."
        ))
    };
    let mut seeds = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b): (u64, u64) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                if b - a >= MAX_SEEDS - seeds.len().min(MAX_SEEDS as usize) as u64 {
                    return Err(too_many(spec));
                }
                seeds.extend(a..=b);
            }
            None if seeds.len() as u64 >= MAX_SEEDS => return Err(too_many(spec)),
            None => seeds.push(part.parse().map_err(|_| bad())?),
        }
    }
    if seeds.is_empty() {
        return Err(bad());
    }
    Ok(seeds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_shown_as_typed_parses_back() {
        for list in [
            vec![0, 1],
            vec![200, 400, 600],
            (0..32).collect(),
            vec![3, 4, 5, 9, 10],
        ] {
            let spec = list_spec(&list);
            assert_eq!(parse_list(&spec, "--x").unwrap(), list, "{spec}");
        }
        assert_eq!(list_spec(&(0..32).collect::<Vec<_>>()), "0..31");
        assert_eq!(list_spec(&[3, 4, 5, 9, 10]), "3..5,9,10");
    }
}
