"""The chat-completions request as a model sees it: the validated body (schemas) and tool calls
(plans, prompting, parsing). Shared by the HTTP layer and the backends; knows no HTTP."""
