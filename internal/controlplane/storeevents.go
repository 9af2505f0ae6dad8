package controlplane

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"cloud.google.com/go/pubsub/v2"
	"cloud.google.com/go/pubsub/v2/apiv1/pubsubpb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/detourhq/detour/internal/blob"
)

// StoreEventsConfig is where the control plane learns of changes to its targets' buckets: GCS
// publishes a message to a Pub/Sub topic for every change of an object under a target's prefix
// (bucket notifications), and every replica pulls them from one subscription, so each change
// reaches one replica, which retires the record of bytes that were replaced or deleted (the
// retirement reaches every replica and agent through etcd and WatchTargets).
type StoreEventsConfig struct {
	// Subscription is the subscription to pull, projects/<project>/subscriptions/<id>; empty: no
	// events (changes are then found by the janitor's reconcile, every ReconcileInterval, and by
	// agents' location checks).
	Subscription string
	// Topic, if set (projects/<project>/topics/<id>), is made if missing, and so is the
	// subscription to it, and each target's bucket gets a notification to it for the target's
	// prefix (blob.Store.EnsureNotification). Empty: the operator sets them up (see README).
	Topic string
	// Endpoint is a Pub/Sub emulator's host:port (plaintext, no authentication); empty:
	// PUBSUB_EMULATOR_HOST if set, else Pub/Sub with the standard Google credentials.
	Endpoint string
}

// Validate checks the names.
func (c StoreEventsConfig) Validate() error {
	if c.Subscription == "" {
		if c.Topic != "" {
			return errors.New("store events: a topic needs a subscription to pull from")
		}
		return nil
	}
	if p := strings.Split(c.Subscription, "/"); len(p) != 4 || p[0] != "projects" || p[2] != "subscriptions" || p[1] == "" || p[3] == "" {
		return fmt.Errorf("store events: subscription %q is not projects/<project>/subscriptions/<id>", c.Subscription)
	}
	if c.Topic != "" {
		if _, _, err := blob.SplitTopic(c.Topic); err != nil {
			return fmt.Errorf("store events: %w", err)
		}
	}
	return nil
}

func (c StoreEventsConfig) project() string { return strings.Split(c.Subscription, "/")[1] }

// storeEvents pulls bucket notifications and hands each to the guard.
type storeEvents struct {
	cfg    StoreEventsConfig
	client *pubsub.Client
}

func newStoreEvents(ctx context.Context, cfg StoreEventsConfig) (*storeEvents, error) {
	var opts []option.ClientOption
	if cfg.Endpoint != "" {
		opts = append(opts, option.WithEndpoint(cfg.Endpoint), option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	}
	c, err := pubsub.NewClient(ctx, cfg.project(), opts...)
	if err != nil {
		return nil, fmt.Errorf("pubsub client: %w", err)
	}
	return &storeEvents{cfg: cfg, client: c}, nil
}

// setup makes the topic and the subscription when a topic is configured, or checks that the
// subscription exists. From its return on, every change is kept for the subscription.
func (e *storeEvents) setup(ctx context.Context) error {
	if e.cfg.Topic != "" {
		_, err := e.client.TopicAdminClient.CreateTopic(ctx, &pubsubpb.Topic{Name: e.cfg.Topic})
		if err != nil && status.Code(err) != codes.AlreadyExists {
			return fmt.Errorf("create topic %s: %w", e.cfg.Topic, err)
		}
		_, err = e.client.SubscriptionAdminClient.CreateSubscription(ctx, &pubsubpb.Subscription{Name: e.cfg.Subscription,
			Topic: e.cfg.Topic, AckDeadlineSeconds: 10, MessageRetentionDuration: durationpb.New(24 * time.Hour)})
		if err != nil && status.Code(err) != codes.AlreadyExists {
			return fmt.Errorf("create subscription %s: %w", e.cfg.Subscription, err)
		}
		return nil
	}
	if _, err := e.client.SubscriptionAdminClient.GetSubscription(ctx, &pubsubpb.GetSubscriptionRequest{Subscription: e.cfg.Subscription}); err != nil {
		return fmt.Errorf("subscription %s: %w", e.cfg.Subscription, err)
	}
	return nil
}

// receive calls handle for each notification until ctx ends; a message whose handling fails is
// not acknowledged, so Pub/Sub delivers it again.
func (e *storeEvents) receive(ctx context.Context, handle func(context.Context, blob.Event, time.Time) error) error {
	sub := e.client.Subscriber(e.cfg.Subscription)
	sub.ReceiveSettings.NumGoroutines = 2
	return sub.Receive(ctx, func(ctx context.Context, m *pubsub.Message) {
		ev, ok := blob.ParseEvent(m.Attributes)
		if !ok {
			m.Ack() // not a bucket notification: nothing to do with it, ever
			return
		}
		if err := handle(ctx, ev, m.PublishTime); err != nil {
			m.Nack()
			return
		}
		m.Ack()
	})
}

func (e *storeEvents) close() { _ = e.client.Close() }
