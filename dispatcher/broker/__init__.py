"""Everything that talks to RabbitMQ.

names (every queue, exchange and header name the dispatcher uses), topology (declaring them),
work_consumer (reading the work queue), acks (the one owner of acknowledgements), settlement
(publishing a delivery to a retry tier, parking or the dead letters, confirmed), parking (holding
a subscriber's deliveries while its breaker is open), publisher (`dispatcher publish`),
dead_letters (`dispatcher dlq`) and cluster (instances sharing a subscriber's limits).
"""
