//! The `machine.lock` lease protocol. TODO(helper): implement.
