//! tandem-server: the OpenAI-compatible HTTP frontend (work in progress).
