"""The reply channel (issue 14): confirm START and STOP in the chat, exactly once, with
evidence.

`rules` decides (pure), `policy` builds the decision's inputs from the configuration,
`store.replies` keeps the queue, `connectors.whatsapp_send` talks to the Cloud API,
`sending` runs one pass over the queue and `worker` runs passes under `waconsent serve`.
"""
