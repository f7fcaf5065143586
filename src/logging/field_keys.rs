//! `,"name":` for each field name, rendered once per thread.
//!
//! Every call's log line writes the same eighteen field names; checking and
//! copying each name piece by piece cost ~140 instructions a field. A field
//! name is a `&'static str` held by its callsite, so its address and length
//! identify it: the rendered key is looked up by them in a small table.

use std::cell::RefCell;

use crate::usage::word_scan::json_escape;

/// Slots in the table (a power of two). A line of the call's 18 fields
/// fits with room to spare; a name that finds its slots taken evicts one.
const SLOTS: usize = 128;

/// Slots tried from the one a name hashes to.
const PROBES: usize = 4;

thread_local! {
    static KEYS: RefCell<FieldKeys> = const { RefCell::new(FieldKeys::new()) };
}

/// Appends `,"name":` to `line`; `false` (nothing written) for the `log.*`
/// fields of a `log` record, which go into the metadata instead.
pub(super) fn push_key(line: &mut String, name: &'static str) -> bool {
    KEYS.with_borrow_mut(|keys| {
        let rendered = keys.get(name);
        line.push_str(rendered);
        !rendered.is_empty()
    })
}

/// Open addressing over `SLOTS` slots (4 KiB a thread that logs).
struct FieldKeys {
    slots: [Option<(&'static str, Box<str>)>; SLOTS],
}

impl FieldKeys {
    const fn new() -> Self {
        FieldKeys {
            slots: [const { None }; SLOTS],
        }
    }

    /// The rendered key of `name`, empty for a `log.*` field.
    fn get(&mut self, name: &'static str) -> &str {
        // Fibonacci hashing of the address: names of one callsite sit a
        // few bytes apart, so the high bits of the product spread them.
        let home = (name.as_ptr() as usize).wrapping_mul(0x9E37_79B9_7F4A_7C15_u64 as usize)
            >> (usize::BITS - SLOTS.trailing_zeros());
        let slot = |probe: usize| (home + probe) % SLOTS;
        let held = (0..PROBES).map(slot).find(|&at| {
            self.slots[at]
                .as_ref()
                .is_some_and(|(held, _)| std::ptr::eq(*held, name))
        });
        let at = held.unwrap_or_else(|| {
            let at = (0..PROBES)
                .map(slot)
                .find(|&at| self.slots[at].is_none())
                .unwrap_or(home);
            self.slots[at] = Some((name, render(name)));
            at
        });
        self.slots[at].as_ref().map_or("", |(_, key)| key)
    }
}

fn render(name: &str) -> Box<str> {
    if name.starts_with("log.") {
        return Box::from("");
    }
    let mut key = String::with_capacity(name.len() + 4);
    key.push(',');
    if json_escape(name.as_bytes(), 0).is_none() {
        key.push('"');
        key.push_str(name);
        key.push('"');
    } else {
        super::push_str_value(&mut key, name);
    }
    key.push(':');
    key.into_boxed_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names leaked to get distinct `'static` addresses.
    fn names(n: usize) -> Vec<&'static str> {
        (0..n)
            .map(|i| &*Box::leak(format!("field_{i}").into_boxed_str()))
            .collect()
    }

    #[test]
    fn every_name_gets_its_own_key_even_past_the_table() {
        let mut keys = FieldKeys::new();
        let names = names(SLOTS * 3);
        // Twice round: the second pass meets names whose slots were taken.
        for _ in 0..2 {
            for name in &names {
                assert_eq!(keys.get(name), format!(",\"{name}\":"));
            }
        }
    }

    #[test]
    fn equal_names_at_other_addresses_render_alike() {
        let mut keys = FieldKeys::new();
        let [a, b] = ["status", "status"].map(|s| &*Box::leak(String::from(s).into_boxed_str()));
        assert!(!std::ptr::eq(a, b));
        assert_eq!(keys.get(a), ",\"status\":");
        assert_eq!(keys.get(b), ",\"status\":");
        assert_eq!(keys.get(a), ",\"status\":");
    }

    #[test]
    fn log_fields_render_empty_and_odd_names_escaped() {
        let mut keys = FieldKeys::new();
        assert_eq!(keys.get("log.target"), "");
        assert_eq!(keys.get("odd \"name\""), ",\"odd \\\"name\\\"\":");
    }
}
