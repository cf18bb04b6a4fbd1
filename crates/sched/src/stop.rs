//! Stop strings over streamed text.
//!
//! Text arrives in pieces (one detokenised chunk per generated token). [`StopMatcher::push`]
//! emits what can no longer be part of a stop string and holds back the longest tail that is
//! still a proper prefix of one, so a stop string split across pieces is still caught and
//! never half-emitted. When a stop string completes, the text before it (plus the stop string
//! itself if `include_stop_str`) is emitted, everything after it is dropped, and the matcher
//! reports `stopped`. At the end of generation, [`StopMatcher::flush`] returns what is held.
//!
//! If several stop strings match, the one that completes first (earliest end) wins, then the
//! one that starts earliest. This is what a token-by-token check would find, and it makes the
//! result independent of how the text is split into pieces. Matching is on bytes at `char`
//! boundaries, so any UTF-8 text works.

/// Result of one [`StopMatcher::push`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopPush {
    /// Text that is safe to send to the client now.
    pub emit: String,
    /// A stop string was found: the request is finished and later pushes emit nothing.
    pub stopped: bool,
}

/// Incremental stop-string matcher of one request.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    include_stop_str: bool,
    held: String,
    stopped: bool,
    matched: Option<String>,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String], include_stop_str: bool) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            include_stop_str,
            ..Self::default()
        }
    }

    /// Whether a stop string has been found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The stop string that ended the text, once found (OpenAI's `stop_reason`).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Text currently held back.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next piece of text.
    pub fn push(&mut self, new_text: &str) -> StopPush {
        if self.stopped {
            return StopPush {
                emit: String::new(),
                stopped: true,
            };
        }
        if self.stops.is_empty() {
            return StopPush {
                emit: new_text.to_string(),
                stopped: false,
            };
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.push_str(new_text);

        // The stop string that completes first (earliest end), then the earliest start.
        let found = self
            .stops
            .iter()
            .filter_map(|s| buf.find(s.as_str()).map(|pos| (pos, s.len(), s)))
            .min_by_key(|&(pos, len, _)| (pos + len, pos));
        if let Some((pos, len, stop)) = found {
            let end = if self.include_stop_str {
                pos + len
            } else {
                pos
            };
            self.stopped = true;
            self.matched = Some(stop.clone());
            buf.truncate(end);
            return StopPush {
                emit: buf,
                stopped: true,
            };
        }

        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&buf, s))
            .max()
            .unwrap_or(0);
        self.held = buf.split_off(buf.len() - hold);
        StopPush {
            emit: buf,
            stopped: false,
        }
    }

    /// Ends the stream: returns the held-back text (empty after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = stop.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&k| {
            stop.is_char_boundary(k)
                && text.is_char_boundary(text.len() - k)
                && text.ends_with(&stop[..k])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher(stops: &[&str], include: bool) -> StopMatcher {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        StopMatcher::new(&stops, include)
    }

    /// Pushes every piece; returns (all emitted text, stopped, flushed text).
    fn run(m: &mut StopMatcher, pieces: &[&str]) -> (String, bool, String) {
        let mut out = String::new();
        let mut stopped = false;
        for p in pieces {
            let r = m.push(p);
            assert!(!stopped || r.emit.is_empty(), "emitted after stop");
            out.push_str(&r.emit);
            stopped |= r.stopped;
        }
        (out, stopped, m.flush())
    }

    #[test]
    fn no_stops_passes_through() {
        let mut m = matcher(&[], false);
        assert_eq!(m.push("hello").emit, "hello");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn stop_inside_one_piece() {
        let mut m = matcher(&["STOP"], false);
        let r = m.push("abcSTOPdef");
        assert_eq!(
            r,
            StopPush {
                emit: "abc".into(),
                stopped: true
            }
        );
        assert_eq!(m.matched(), Some("STOP"));
        assert_eq!(m.push("more").emit, "");
        assert_eq!(m.flush(), "");
    }

    #[test]
    fn include_stop_str() {
        let mut m = matcher(&["STOP"], true);
        assert_eq!(
            run(&mut m, &["ab", "cST", "OPx"]),
            ("abcSTOP".into(), true, String::new())
        );
    }

    #[test]
    fn stop_split_across_pushes_is_held_back() {
        let mut m = matcher(&["\n\n"], false);
        assert_eq!(m.push("Hello\n").emit, "Hello");
        assert_eq!(m.held(), "\n");
        let r = m.push("\nWorld");
        assert_eq!(
            r,
            StopPush {
                emit: String::new(),
                stopped: true
            }
        );
        let mut m = matcher(&["<|end|>"], false);
        assert_eq!(
            run(&mut m, &["x <|", "en", "d|", ">tail"]),
            ("x ".into(), true, String::new())
        );
    }

    #[test]
    fn false_alarm_is_released() {
        let mut m = matcher(&["abc"], false);
        assert_eq!(m.push("xab").emit, "x");
        assert_eq!(m.push("d").emit, "abd");
        assert_eq!(m.push("ab").emit, "");
        assert_eq!(m.flush(), "ab");
    }

    #[test]
    fn overlapping_prefixes() {
        // "aab" inside "aaab": the held tail must restart at the right place.
        let mut m = matcher(&["aab"], false);
        assert_eq!(
            run(&mut m, &["a", "a", "a", "b", "c"]),
            ("a".into(), true, String::new())
        );
        // "bc" completes before "abcd" does, even though "abcd" starts first.
        let mut m = matcher(&["abcd", "bc"], false);
        assert_eq!(
            run(&mut m, &["xab", "cd"]),
            ("xa".into(), true, String::new())
        );
        // Same start: the shorter completes first.
        let mut m = matcher(&["ab", "abc"], true);
        assert_eq!(run(&mut m, &["zabc"]), ("zab".into(), true, String::new()));
        // Same end: the one that starts first.
        let mut m = matcher(&["bc", "abc"], false);
        assert_eq!(run(&mut m, &["zabc"]), ("z".into(), true, String::new()));
    }

    #[test]
    fn unicode() {
        let mut m = matcher(&["。终"], false);
        assert_eq!(
            run(&mut m, &["你好", "。", "终了"]),
            ("你好".into(), true, String::new())
        );
        let mut m = matcher(&["🙂!"], true);
        assert_eq!(
            run(&mut m, &["é🙂", "?🙂", "!x"]),
            ("é🙂?🙂!".into(), true, String::new())
        );
        let mut m = matcher(&["ñx"], false);
        assert_eq!(run(&mut m, &["añ", "ñ"]), ("añ".into(), false, "ñ".into()));
    }

    #[test]
    fn flush_returns_held_text_when_no_stop() {
        let mut m = matcher(&["END"], false);
        assert_eq!(
            run(&mut m, &["the E", "N"]),
            ("the ".into(), false, "EN".into())
        );
    }

    #[test]
    fn result_does_not_depend_on_the_split() {
        let stops = ["abz", "\n\n\n", "bd", "d\n"];
        for text in ["abcabdabxy\n\nz", "xxabzq", "é\n\n\nabz", "no stop here"] {
            let (whole, whole_stopped, whole_rest) = run(&mut matcher(&stops, false), &[text]);
            let cuts: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for &i in &cuts {
                for &j in cuts.iter().filter(|&&j| j >= i) {
                    let pieces = [&text[..i], &text[i..j], &text[j..]];
                    let got = run(&mut matcher(&stops, false), &pieces);
                    assert_eq!(
                        got,
                        (whole.clone(), whole_stopped, whole_rest.clone()),
                        "{pieces:?}"
                    );
                    if !got.1 {
                        assert_eq!(got.0 + &got.2, text);
                    }
                }
            }
        }
    }
}
