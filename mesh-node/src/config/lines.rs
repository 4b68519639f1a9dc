//! Where each field of a configuration file is, so refusals can name its line.
//!
//! serde reports errors against the innermost container (an unknown top-level key is placed
//! at the start of the document), and validation runs on the typed value, which has no
//! positions at all. So a failed load re-reads the text twice more, on the error path only:
//! once through `serde_path_to_error` for the field path of a serde error, and once into a
//! tree of spanned keys that maps every field path (`datapath.excluded_cidrs[3]`) to its line.

use std::{borrow::Cow, cell::RefCell, collections::HashMap};

use serde::{
    Deserialize, Deserializer,
    de::{DeserializeOwned, MapAccess, SeqAccess, Visitor},
};
use serde_saphyr::Spanned;

use super::ConfigError;

/// The 1-based line of every key and sequence item of a YAML document, by field path.
#[derive(Debug, Default)]
pub struct Lines(HashMap<String, u64>);

impl Lines {
    /// Indexes `text`; a document that is not YAML yields an empty index.
    pub fn of(text: &str) -> Self {
        let mut lines = HashMap::new();
        if let Ok(root) = serde_saphyr::from_str::<Node>(text) {
            root.index(String::new(), &mut lines);
        }
        Self(lines)
    }

    /// The line of `field`, else of the nearest enclosing field the file spells out (a missing
    /// `workloads[0].cgroup` is reported at `workloads[0]`). `a/b` paths, which name a pair of
    /// fields, are looked up by their first member.
    pub fn line(&self, field: &str) -> Option<u64> {
        let mut path = field.split('/').next().unwrap_or(field);
        loop {
            if let Some(line) = self.0.get(path) {
                return Some(*line);
            }
            path = &path[..path.rfind(['.', '['])?];
        }
    }
}

/// A YAML node reduced to what locating fields needs: keys and items with their positions.
enum Node {
    Scalar,
    Seq(Vec<Spanned<Node>>),
    Map(Vec<(Spanned<Key>, Node)>),
}

impl Node {
    fn index(self, path: String, lines: &mut HashMap<String, u64>) {
        match self {
            Node::Scalar => {}
            Node::Seq(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    lines.entry(path.clone()).or_insert(item.referenced.line());
                    item.value.index(path, lines);
                }
            }
            Node::Map(entries) => {
                for (key, value) in entries {
                    let path = if path.is_empty() {
                        key.value.0
                    } else {
                        format!("{path}.{}", key.value.0)
                    };
                    lines.entry(path.clone()).or_insert(key.referenced.line());
                    value.index(path, lines);
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML node")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_i128<E>(self, _: i128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_u128<E>(self, _: u128) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Scalar)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(Node::Map(entries))
    }
}

/// A mapping key as text, whatever scalar it is written as.
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_bool<E>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E>(self) -> Result<Key, E> {
                Ok(Key("~".into()))
            }
            fn visit_none<E>(self) -> Result<Key, E> {
                Ok(Key("~".into()))
            }
        }
        deserializer.deserialize_any(KeyVisitor)
    }
}

thread_local! {
    /// The field path of the last failed [`Tracked`] deserialization on this thread: serde
    /// gives a `Deserialize` impl no other way to hand data past the parser's error type.
    static FAILED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `T`, deserialized while recording the field path being read when it fails.
struct Tracked<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Tracked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut track = serde_path_to_error::Track::new();
        let result = T::deserialize(serde_path_to_error::Deserializer::new(
            deserializer,
            &mut track,
        ));
        if result.is_err() {
            let path = track.path().to_string();
            FAILED_AT.with(|at| at.replace(Some(path)));
        }
        result.map(Tracked)
    }
}

/// Deserializes a configuration file; a refusal names the field path and its line.
pub fn from_yaml<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    FAILED_AT.with(|at| at.replace(None));
    let error = match serde_saphyr::from_str::<Tracked<T>>(text) {
        Ok(Tracked(value)) => return Ok(value),
        Err(error) => error,
    };
    let mut path = FAILED_AT
        .with(std::cell::RefCell::take)
        .filter(|p| p != ".")
        .unwrap_or_default();
    // `?` stands for a key that is not a string (as in broken flow syntax): name its parent.
    if let Some(cut) = path.find('?') {
        path.truncate(cut);
        path.truncate(path.trim_end_matches('.').len());
    }
    let (message, located, location) = message_of(&error);
    // serde reports a missing field against its parent; name the field itself.
    let field = match message
        .strip_prefix("missing field `")
        .and_then(|m| m.split_once('`'))
    {
        Some((name, _)) if path.is_empty() => name.to_owned(),
        Some((name, _)) => format!("{path}.{name}"),
        None => path,
    };
    let line = match Lines::of(text).line(&field) {
        Some(line) => Some(line),
        None => location.map(|l| l.line()),
    };
    Err(ConfigError::Parse {
        path: Default::default(),
        reason: if field.is_empty() { located } else { message },
        field,
        line,
    })
}

/// The parser's message without its own position (a refusal that names a field carries the
/// field's line), the message with it (for errors about no one field, such as YAML syntax, whose
/// column helps), and that position.
fn message_of(error: &serde_saphyr::Error) -> (String, String, Option<serde_saphyr::Location>) {
    let plain = error.render_with_options(serde_saphyr::render_options! {
        formatter: &Unlocated,
        snippets: serde_saphyr::SnippetMode::Off,
    });
    let located = error.render_with_options(serde_saphyr::render_options! {
        snippets: serde_saphyr::SnippetMode::Off,
    });
    (plain, located, error.location())
}

/// serde-saphyr's own wording, without the ` at line L, column C` its renderer appends.
struct Unlocated;

impl serde_saphyr::MessageFormatter for Unlocated {
    fn localizer(&self) -> &dyn serde_saphyr::Localizer {
        self
    }

    fn format_message<'a>(&self, err: &'a serde_saphyr::Error) -> Cow<'a, str> {
        serde_saphyr::MessageFormatter::format_message(&serde_saphyr::DefaultMessageFormatter, err)
    }
}

impl serde_saphyr::Localizer for Unlocated {
    fn attach_location<'a>(&self, base: Cow<'a, str>, _: serde_saphyr::Location) -> Cow<'a, str> {
        base
    }
}
