//! Who is acting, for the audit log: the name of the API token a request
//! came with, set for the thread that carries the request out.
//!
//! The admin API runs each backend call on a blocking thread inside
//! [`acting_as`]; [`crate::audit::AuditLog::append`] fills an event's
//! `actor` from [`current`] when the event names none. Work that the
//! request hands to other threads (a rotation's pipeline, the scheduler)
//! records its own actor or none.

use std::cell::RefCell;

thread_local! {
    static CURRENT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f` with `name` as the current actor of this thread, and restores
/// the one before (also when `f` panics).
pub fn acting_as<R>(name: Option<String>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            CURRENT.with(|c| *c.borrow_mut() = before);
        }
    }
    let before = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), name));
    let _restore = Restore(before);
    f()
}

/// The current actor of this thread, if any.
pub fn current() -> Option<String> {
    CURRENT.with(|c| c.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_actor_is_scoped_and_restored() {
        assert_eq!(current(), None);
        acting_as(Some("a".into()), || {
            assert_eq!(current().as_deref(), Some("a"));
            acting_as(Some("b".into()), || {
                assert_eq!(current().as_deref(), Some("b"))
            });
            assert_eq!(current().as_deref(), Some("a"));
        });
        assert_eq!(current(), None);
        let r = std::panic::catch_unwind(|| acting_as(Some("c".into()), || panic!("x")));
        assert!(r.is_err());
        assert_eq!(current(), None);
    }
}
