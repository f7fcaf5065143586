//! Usage extraction: reads the token usage a provider reports out of a
//! response body, JSON or streamed, while the body is forwarded untouched.
//!
//! (Flow comment and submodules: to be written by the usage module.)

/// Token counts of one call, normalised across providers (SPEC §4).
/// `None` means the provider did not report that quantity; never coerce
/// absent to zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// All prompt-side tokens, cache reads and cache writes included.
    pub input_tokens: Option<u64>,
    /// All generated tokens billed as output, reasoning included.
    pub output_tokens: Option<u64>,
    /// Cache reads (subset of `input_tokens`).
    pub cached_input_tokens: Option<u64>,
    /// Cache writes (subset of `input_tokens`), all TTLs.
    pub cache_write_input_tokens: Option<u64>,
    /// The part of `cache_write_input_tokens` written with a 1-hour TTL
    /// (Anthropic `cache_creation.ephemeral_1h_input_tokens`), priced higher.
    pub cache_write_1h_input_tokens: Option<u64>,
    /// Reasoning/thinking tokens (subset of `output_tokens`).
    pub reasoning_tokens: Option<u64>,
}

/// Which provider family's response shapes a route speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI and every OpenAI-compatible server (Azure, vLLM, Ollama,
    /// OpenRouter, DeepSeek, Groq, Mistral, xAI…), chat completions,
    /// completions, responses and embeddings.
    OpenAi,
    Anthropic,
    Gemini,
}
