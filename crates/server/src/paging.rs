//! Offset pagination for lists held in memory.

/// Page size when a request gives 0.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page a request may ask for.
pub const MAX_PAGE_SIZE: usize = 1000;

#[derive(Debug, thiserror::Error)]
#[error("page_token `{0}` is not a token this service gave")]
pub struct BadPageToken(pub String);

/// The requested page size, defaulted and capped.
pub fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// One page of `items` and the token of the next (empty on the last page).
pub fn page<T: Clone>(
    items: &[T],
    requested_size: u32,
    token: &str,
) -> Result<(Vec<T>, String), BadPageToken> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| BadPageToken(token.to_string()))?
    };
    let end = start
        .saturating_add(page_size(requested_size))
        .min(items.len());
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((items.get(start..end).unwrap_or_default().to_vec(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_through() {
        let items: Vec<u32> = (0..5).collect();
        let (first, next) = page(&items, 2, "").unwrap();
        assert_eq!((first, next.as_str()), (vec![0, 1], "2"));
        let (last, next) = page(&items, 10, "4").unwrap();
        assert_eq!((last, next.as_str()), (vec![4], ""));
        assert!(page(&items, 1, "x").is_err());
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(5000), MAX_PAGE_SIZE);
    }
}
