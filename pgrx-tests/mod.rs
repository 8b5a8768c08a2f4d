//! In-database tests (`cargo pgrx test`): every SQL function, every bad input with its
//! SQLSTATE and message. Behaviour that starts at commit is tested black-box in `tests/`.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn capabilities_has_the_openwop_shape() {
        let caps = Spi::get_one::<pgrx::JsonB>("SELECT dispatched.capabilities()")
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(
            caps["capabilities"]["idempotency"]["layer1RetentionSeconds"],
            86400
        );
    }
}
