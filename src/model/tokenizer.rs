//! CLIP's byte-level BPE tokenizer, built from the `vocab.json` + `merges.txt` diffusers
//! saves (or a `tokenizer.json` when present), padded to the model length as SD does.
//!
//! Pseudo-words (`<v0>`, `<v1>`, ...) are added tokens, never split. Their ids are
//! remapped to `encoder_vocab + k`, so the text encoder reads them from its added rows.
//! An alias (`<v0>` -> "sks person", DreamBooth's identifier) is text put in the word's
//! place before tokenizing: prompts name every method's subjects the same way.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{
    replace::ReplacePattern, Lowercase, Replace, Sequence as NormSeq, NFC,
};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// CLIP's word-splitting pattern (the same one `CLIPTokenizer` uses).
const CLIP_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner` as loaded, before any pseudo-word: what [`Self::reset`] returns to.
    loaded: tokenizers::Tokenizer,
    base_vocab: u32,
    encoder_vocab: u32,
    pad_id: u32,
    eos_id: u32,
    max_len: usize,
    added: Vec<String>,
    /// `<vN>` -> the text it stands for, in the order added.
    aliases: Vec<(String, String)>,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, or builds the tokenizer from `vocab.json`/`merges.txt`.
    /// `encoder_vocab` is the text encoder's vocabulary size.
    pub fn load(dir: &Path, encoder_vocab: usize, max_positions: usize) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        let mut inner = if json.is_file() {
            tokenizers::Tokenizer::from_file(&json).map_err(|e| bad(&json, e))?
        } else {
            build_from_vocab(dir)?
        };
        let cfg = TokenizerSettings::read(dir);
        // transformers treats the pad token (SD 2.x: "!") as special: a "!" in a prompt is
        // always that token, never merged by BPE. Mirror it.
        if let Some(pad) = cfg.pad_token.as_deref().filter(|p| *p != BOS && *p != EOS) {
            inner
                .add_special_tokens([AddedToken::from(pad, true)])
                .map_err(|e| bad(dir, e))?;
        }
        let id = |tok: &str| inner.token_to_id(tok);
        let eos_id = id(EOS).ok_or_else(|| {
            Error::bad_file(
                dir,
                format!("the tokenizer in {} has no {EOS} token", dir.display()),
            )
        })?;
        let pad_id = cfg.pad_token.as_deref().and_then(id).unwrap_or(eos_id);
        let base_vocab = inner.get_vocab_size(true) as u32;
        if base_vocab as usize > encoder_vocab {
            return Err(Error::mismatch(dir, format!(
                "the tokenizer in {} has {base_vocab} tokens but the text encoder only {encoder_vocab}: \
                 tokenizer and text_encoder come from different models.",
                dir.display()
            )));
        }
        let max_len = cfg
            .model_max_length
            .unwrap_or(max_positions)
            .min(max_positions);
        Ok(Self {
            loaded: inner.clone(),
            inner,
            base_vocab,
            encoder_vocab: encoder_vocab as u32,
            pad_id,
            eos_id,
            max_len,
            added: Vec::new(),
            aliases: Vec::new(),
        })
    }

    /// Forgets every pseudo-word and alias: the tokenizer as loaded, for the next run on
    /// the same model (`batch` trains many pairs, and methods, with one model load).
    pub fn reset(&mut self) {
        self.inner = self.loaded.clone();
        self.added.clear();
        self.aliases.clear();
    }

    /// The end-of-text token's id (SDXL pools the hidden state at its first place).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The position of the first end-of-text token after the start token in `ids` (a
    /// prompt's encoding): where its text ends.
    pub fn end_of_text(&self, ids: &[u32]) -> Option<usize> {
        (ids.iter().skip(1).position(|&i| i == self.eos_id)).map(|p| p + 1)
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Adds pseudo-words; returns their ids as the text encoder sees them.
    pub fn add_pseudo_words(&mut self, words: &[String]) -> Result<Vec<u32>> {
        for w in words {
            if self.inner.token_to_id(w).is_some() && !self.added.contains(w) {
                return Err(Error::usage(format!(
                    "{w:?} is already a word of the tokenizer; pick another pseudo-word"
                )));
            }
        }
        let fresh: Vec<AddedToken> = words
            .iter()
            .filter(|w| !self.added.contains(w))
            .map(|w| AddedToken::from(w.clone(), true))
            .collect();
        self.inner
            .add_tokens(fresh.clone())
            .map_err(|e| Error::internal(format!("cannot add pseudo-words: {e}")))?;
        self.added.extend(fresh.into_iter().map(|t| t.content));
        Ok(words
            .iter()
            .map(|w| self.pseudo_word_id(w).unwrap_or(0))
            .collect())
    }

    pub fn pseudo_words(&self) -> &[String] {
        &self.added
    }

    /// Makes each `(word, text)`'s word stand for its text in every prompt (DreamBooth's
    /// identifiers: `<v0>` -> "sks person"). A word cannot be both an alias and a
    /// pseudo-word with a row.
    pub fn add_aliases(&mut self, aliases: &[(String, String)]) -> Result<()> {
        for (word, text) in aliases {
            if self.added.contains(word) {
                return Err(Error::usage(format!(
                    "{word} has an embedding row and an alias ({text:?}): a model takes one."
                )));
            }
            self.aliases.retain(|(w, _)| w != word);
            self.aliases.push((word.clone(), text.clone()));
        }
        Ok(())
    }

    /// `text` with every alias replaced by what it stands for.
    fn expand(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (word, with) in &self.aliases {
            out = out.replace(word.as_str(), with);
        }
        out
    }

    fn pseudo_word_id(&self, w: &str) -> Option<u32> {
        self.added
            .iter()
            .position(|a| a == w)
            .map(|k| self.encoder_vocab + k as u32)
    }

    /// Token ids with BOS/EOS, pseudo-words mapped to their rows; any length.
    fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(self.expand(text), true)
            .map_err(|e| Error::usage(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(enc
            .get_ids()
            .iter()
            .zip(enc.get_tokens())
            .map(|(&id, tok)| {
                if id >= self.base_vocab {
                    self.pseudo_word_id(tok).unwrap_or(id)
                } else {
                    id
                }
            })
            .collect())
    }

    /// Whether `text` (a `what`: "the prompt", "the sample prompt") fits the text
    /// encoder's window. A pseudo-word past it would be dropped without a trace: refused.
    /// Other words past it: `Some(warning)`, with the token count.
    pub fn check_length(&self, text: &str, what: &str) -> Result<Option<String>> {
        let ids = self.ids(text)?;
        if ids.len() <= self.max_len {
            return Ok(None);
        }
        let cut = &ids[self.max_len - 1..ids.len() - 1];
        let lost: Vec<&String> = (self.added.iter())
            .filter(|w| self.pseudo_word_id(w).is_some_and(|id| cut.contains(&id)))
            .collect();
        let (n, max) = (ids.len(), self.max_len);
        if lost.is_empty() {
            return Ok(Some(format!(
                "{what} {text:?} is {n} tokens long; the text encoder reads the first {max}, \
                 so its end is ignored."
            )));
        }
        let lost: Vec<&str> = lost.iter().map(|w| w.as_str()).collect();
        Err(Error::usage(format!(
            "{what} {text:?} is {n} tokens long, over the text encoder's {max}: {} would fall \
             past the end and be ignored. Shorten it, or put the pseudo-words first.",
            lost.join(", ")
        )))
    }

    /// Token ids with BOS/EOS, truncated and padded to the model length.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.ids(text)?;
        if ids.len() > self.max_len {
            ids.truncate(self.max_len - 1);
            ids.push(self.eos_id);
        }
        ids.resize(self.max_len, self.pad_id);
        Ok(ids)
    }

    /// The positions (in `encode(prompt)`) of `word`'s tokens (an alias's: those of its
    /// text), where `prompt` is `before` followed by a space and `word`. `None` when the
    /// word has no token of its own in this vocabulary (it tokenizes to nothing, to the
    /// unknown token, or past the model length).
    pub fn word_positions(&self, before: &str, word: &str) -> Result<Option<Vec<usize>>> {
        let raw = |text: &str| -> Result<Vec<u32>> {
            let enc = self
                .inner
                .encode(self.expand(text), true)
                .map_err(|e| Error::usage(format!("cannot tokenize {text:?}: {e}")))?;
            let mut ids = enc.get_ids().to_vec();
            ids.pop(); // EOS
            Ok(ids)
        };
        let (head, full) = (raw(before)?, raw(&format!("{before} {word}"))?);
        if full.len() <= head.len() || !full.starts_with(&head) || full.len() >= self.max_len {
            return Ok(None);
        }
        // CLIP's unknown token is its EOS.
        if full[head.len()..].contains(&self.eos_id) {
            return Ok(None);
        }
        Ok(Some((head.len()..full.len()).collect()))
    }

    /// Words of the form `<...>` in a prompt that are not known pseudo-words.
    pub fn unknown_pseudo_words(&self, text: &str) -> Vec<String> {
        let known = |w: &String| self.added.contains(w) || self.aliases.iter().any(|(a, _)| a == w);
        pseudo_words_in(text)
            .into_iter()
            .filter(|w| !known(w))
            .collect()
    }
}

fn bad(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::bad_file(
        path,
        format!("cannot load the tokenizer from {}: {e}", path.display()),
    )
}

/// The pipeline `transformers` builds when it converts `CLIPTokenizer` to a fast one.
fn build_from_vocab(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for f in [&vocab, &merges] {
        if !f.is_file() {
            return Err(Error::bad_file(f, format!(
                "{} is missing: a diffusers tokenizer/ folder needs tokenizer.json, or vocab.json and merges.txt.",
                f.display()
            )));
        }
    }
    let path_str = |p: &Path| p.to_string_lossy().into_owned();
    let bpe = BPE::from_file(&path_str(&vocab), &path_str(&merges))
        .end_of_word_suffix("</w>".into())
        .unk_token(EOS.into())
        .build()
        .map_err(|e| bad(&vocab, e))?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    let whitespace =
        Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(|e| bad(dir, e))?;
    tok.with_normalizer(Some(NormSeq::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])))
    .map_err(|e| bad(dir, e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| bad(dir, e))?;
    tok.with_pre_tokenizer(Some(PreSeq::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    let id = |t: &str| {
        tok.token_to_id(t).ok_or_else(|| {
            Error::bad_file(&vocab, format!("{} lacks the token {t}", vocab.display()))
        })
    };
    let (bos, eos) = (id(BOS)?, id(EOS)?);
    let post = RobertaProcessing::new((EOS.into(), eos), (BOS.into(), bos))
        .trim_offsets(false)
        .add_prefix_space(false);
    tok.with_post_processor(Some(post));
    // The special tokens must never be split by BPE.
    tok.add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
        .map_err(|e| bad(dir, e))?;
    Ok(tok)
}

/// The bits of `tokenizer_config.json` / `special_tokens_map.json` that matter here.
#[derive(Default)]
struct TokenizerSettings {
    pad_token: Option<String>,
    model_max_length: Option<usize>,
}

impl TokenizerSettings {
    fn read(dir: &Path) -> Self {
        let mut s = Self::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let Ok(text) = std::fs::read_to_string(dir.join(name)) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            if s.pad_token.is_none() {
                s.pad_token = match v.get("pad_token") {
                    Some(serde_json::Value::String(t)) => Some(t.clone()),
                    Some(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                    None => None,
                };
            }
            if s.model_max_length.is_none() {
                // Unset lengths are written as a huge sentinel (1e30); ignore those.
                s.model_max_length = v
                    .get("model_max_length")
                    .and_then(|m| m.as_u64())
                    .filter(|&m| m < 1_000_000)
                    .map(|m| m as usize);
            }
        }
        s
    }
}

/// The pseudo-word of sample `i`: `<v0>` for the concept, `<v1>`, ... for components.
pub fn pseudo_word(i: usize) -> String {
    format!("<v{i}>")
}

/// The `<...>` words of `text`, once each, in order (BOS and EOS are not pseudo-words).
pub fn pseudo_words_in(text: &str) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else {
            break;
        };
        let word = &rest[start..start + len + 1];
        if word != BOS && word != EOS && !words.iter().any(|w| w == word) {
            words.push(word.to_string());
        }
        rest = &rest[start + len + 1..];
    }
    words
}
