-- A flow defined and started from SQL alone: psql "$DATABASE_URL" -f examples/create_order.sql
-- The step handlers (validate_order, get_product, calculate_total, charge)
-- are Rust, in examples/flow.rs; its worker runs them.
select cairn.create_flow('create_order', $$
{
  "description": "validate an order, price it, charge it",
  "steps": [
    {"name": "validate_order"},
    {"name": "get_product", "after": ["validate_order"], "input": "$.input.product_id"},
    {"name": "calculate_total", "after": ["get_product"],
     "input": {"price": "$.get_product.price", "quantity": "$.input.quantity"}},
    {"name": "charge", "after": ["calculate_total"], "when": "$.calculate_total > 0",
     "input": "$.calculate_total", "retry": {"max_attempts": 5, "backoff": 0.5}}
  ]
}
$$) as version;

select * from cairn.plan_flow('create_order');

select cairn.start_flow('create_order', '{"product_id": 7, "quantity": 3}',
                        idempotency_key => 'order-7') as run_id;
