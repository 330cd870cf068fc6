//! Text in and out: a model directory's `tokenizer.json`, streamed decoding that
//! never splits a UTF-8 character, and stop sequences.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer {path}: {msg}")]
    Load { path: String, msg: String },
    #[error("tokenization failed: {0}")]
    Encode(String),
}

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    max_token_bytes: usize,
}

impl Tokenizer {
    /// `dir/tokenizer.json`, or `None` when the directory has none.
    pub fn from_dir(dir: &Path) -> Result<Option<Self>, TextError> {
        Self::load(dir, None)
    }

    /// The tokenizer of a model: `tokenizer` when given (a `tokenizer.json`
    /// file, or a directory holding one: released checkpoints keep theirs
    /// apart from the weights), else `model_dir/tokenizer.json`, else `None`.
    pub fn load(model_dir: &Path, tokenizer: Option<&Path>) -> Result<Option<Self>, TextError> {
        let path = match tokenizer {
            Some(t) if t.is_dir() => t.join("tokenizer.json"),
            Some(t) => t.to_path_buf(),
            None => model_dir.join("tokenizer.json"),
        };
        if tokenizer.is_none() && !path.exists() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| TextError::Load { path: path.display().to_string(), msg: e.to_string() })?;
        Ok(Some(Self::new(inner)))
    }

    pub fn from_json(json: &str) -> Result<Self, TextError> {
        let inner = json.parse::<tokenizers::Tokenizer>().map_err(|e| TextError::Load { path: "<json>".into(), msg: e.to_string() })?;
        Ok(Self::new(inner))
    }

    fn new(inner: tokenizers::Tokenizer) -> Self {
        // A vocabulary entry's string is at least as long in UTF-8 as the text
        // it stands for (byte-level BPE spells each byte as one character);
        // its decoded text bounds it too, whichever is longer.
        let max_token_bytes = inner.get_vocab(true).iter().map(|(s, &id)| s.len().max(inner.decode(&[id], false).map_or(0, |t| t.len()))).max().unwrap_or(1);
        Self { inner, max_token_bytes }
    }

    /// An upper bound on the bytes of text one token stands for: text of `n`
    /// bytes has at least `n / max_token_bytes` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TextError> {
        Ok(self.inner.encode(text, false).map_err(|e| TextError::Encode(e.to_string()))?.get_ids().to_vec())
    }

    /// Decode ids to text; bytes of an incomplete character come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Streams the text of a growing token sequence: each `push` returns only text
/// that is complete. A trailing U+FFFD (an unfinished multi-byte character whose
/// bytes span tokens) is held back until the next tokens complete it.
pub struct IncrementalDecoder<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    /// Bytes of decoded text already returned.
    sent: usize,
}

impl<'t> IncrementalDecoder<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        Self { tok, ids: vec![], sent: 0 }
    }

    /// Start after tokens whose text was already delivered.
    pub fn with_prefix(tok: &'t Tokenizer, ids: &[u32]) -> Self {
        let mut d = Self::new(tok);
        d.push(ids);
        d
    }

    pub fn push(&mut self, ids: &[u32]) -> String {
        self.ids.extend_from_slice(ids);
        let text = self.tok.decode(&self.ids);
        let complete = text.trim_end_matches('\u{FFFD}');
        // Held-back bytes may turn out to be real U+FFFD characters only if more
        // text follows them, which the next push shows.
        if complete.len() <= self.sent {
            return String::new();
        }
        let out = complete[self.sent..].to_string();
        self.sent = complete.len();
        out
    }

    /// Everything decoded so far (complete characters only).
    pub fn text(&self) -> String {
        let text = self.tok.decode(&self.ids);
        text.trim_end_matches('\u{FFFD}').to_string()
    }

    /// Whatever is left at the end of the stream, incomplete bytes included.
    pub fn finish(&mut self) -> String {
        let text = self.tok.decode(&self.ids);
        let out = text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = text.len();
        out
    }
}

/// Byte offset in `text` where the earliest stop sequence starts, if any does.
pub fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// A byte-level BPE tokenizer with no merges: id 0 is `<|endoftext|>`, ids 1..=256
/// are the 256 bytes in GPT-2's byte-to-unicode alphabet. Every string round-trips.
/// Used for the random-weight demo model until a trained tokenizer is bundled.
pub fn byte_level_tokenizer_json() -> String {
    // GPT-2's reversible byte -> printable char mapping.
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, char)> = bs.into_iter().zip(cs.into_iter().map(|c| char::from_u32(c).unwrap())).collect();
    pairs.sort();
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for (b, c) in pairs {
        vocab.insert(c.to_string(), (b + 1).into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{ "id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true }],
        "normalizer": null,
        "pre_tokenizer": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "post_processor": null,
        "decoder": { "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true },
        "model": { "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": [] }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_tok() -> Tokenizer {
        Tokenizer::from_json(&byte_level_tokenizer_json()).unwrap()
    }

    #[test]
    fn byte_tokenizer_round_trips_any_text() {
        let t = bytes_tok();
        assert_eq!(t.vocab_size(), 257);
        let s = "def f(x):\n    return x ** 2  # é, 漢字, 🦀";
        let ids = t.encode(s).unwrap();
        assert_eq!(ids.len(), s.len(), "one id per byte");
        assert_eq!(t.encode("A").unwrap(), vec![b'A' as u32 + 1]);
        assert_eq!(t.decode(&ids), s);
    }

    #[test]
    fn incremental_decoding_never_splits_a_character() {
        let t = bytes_tok();
        let s = "a漢🦀b";
        let ids = t.encode(s).unwrap();
        let mut d = IncrementalDecoder::new(&t);
        let pieces: Vec<String> = ids.iter().map(|&i| d.push(&[i])).collect();
        // 'a', then nothing until the 3 bytes of 漢 are in, then the 4 of 🦀, then 'b'.
        assert_eq!(pieces, ["a", "", "", "漢", "", "", "", "🦀", "b"]);
        assert_eq!(pieces.concat(), s);
        let mut d = IncrementalDecoder::with_prefix(&t, &ids[..2]);
        assert_eq!(d.push(&ids[2..4]), "漢");
    }

    #[test]
    fn stop_sequences_find_the_earliest() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(find_stop("abc END x\n\n", &stops), Some(4));
        assert_eq!(find_stop("abc", &stops), None);
    }
}
