//! Card-number (PAN) detection. Card data never enters orderflow: the ingest edge rejects any
//! request carrying what looks like one, and validation rejects a payment token that is one.
//! "Looks like" means 13–19 digits, optionally separated by single spaces or dashes, passing
//! the Luhn check.

/// Whether `text` contains a run of 13–19 digits (single spaces or dashes allowed between
/// digits) that passes the Luhn check.
pub fn contains_card_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut start = 0;
    while start < bytes.len() {
        if !bytes[start].is_ascii_digit() {
            start += 1;
            continue;
        }
        // Collect the digit run beginning at `start`, skipping single separators.
        let mut digits = Vec::with_capacity(19);
        let mut i = start;
        while i < bytes.len() {
            let b = bytes[i];
            if b.is_ascii_digit() {
                digits.push(b - b'0');
                i += 1;
            } else if (b == b' ' || b == b'-')
                && i + 1 < bytes.len()
                && bytes[i + 1].is_ascii_digit()
                && !digits.is_empty()
            {
                i += 1;
            } else {
                break;
            }
        }
        // The whole run is the candidate. Sub-windows are not checked: one in ten of them
        // passes Luhn by chance, which would reject ordinary long numbers.
        if (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
            return true;
        }
        start = i.max(start + 1);
    }
    false
}

/// The Luhn checksum over decimal digits (most significant first).
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_test_card_numbers_are_found() {
        for pan in [
            "4242424242424242",
            "4242 4242 4242 4242",
            "5555-5555-5555-4444",
            "378282246310005",
            "my card is 4111111111111111, thanks",
        ] {
            assert!(contains_card_number(pan), "{pan}");
        }
    }

    #[test]
    fn ordinary_text_and_ids_are_not_card_numbers() {
        for text in [
            "tok_visa_4242",
            "SKU-00042",
            "4242424242424241", // fails Luhn
            "123456789012",     // 12 digits
            "0192f0c2-3b4a-7cde-8f01-23456789abcd",
            "",
            "12 St James's Square",
        ] {
            assert!(!contains_card_number(text), "{text}");
        }
    }
}
